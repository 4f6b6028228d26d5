/* osslkey: RSA private keys in OpenSSL 3's secure heap; see osslkey.h. */
#define _GNU_SOURCE
/* RSA_clear_flags, RSA_private_decrypt and RSA_padding_check_PKCS1_OAEP_mgf1 are deprecated
 * in OpenSSL 3 but are its only way to run a private operation without the Montgomery cache
 * of p and q (see uncached_key). */
#define OPENSSL_SUPPRESS_DEPRECATED
#include "osslkey.h"

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

#include <openssl/bio.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/decoder.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/opensslv.h>
#include <openssl/pem.h>
#include <openssl/pkcs12.h>
#include <openssl/params.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#if OPENSSL_VERSION_MAJOR < 3
#error "osslkey needs OpenSSL 3 (OSSL_DECODER, EVP_PKEY_todata, BIO_s_secmem)"
#endif
#ifdef OPENSSL_NO_DEPRECATED_3_0
#error "osslkey needs OpenSSL 3's RSA API (built without no-deprecated): see uncached_key"
#endif

static pthread_once_t init_once = PTHREAD_ONCE_INIT;
static int init_result;
static size_t init_size, init_minsize;

static void do_init(void)
{
    init_result = CRYPTO_secure_malloc_initialized() ? 1
                  : CRYPTO_secure_malloc_init(init_size, init_minsize);
}

int nk_secure_init(size_t size, size_t minsize)
{
    init_size = size;
    init_minsize = minsize;
    pthread_once(&init_once, do_init);
    return init_result;
}

int nk_secure_initialized(void) { return CRYPTO_secure_malloc_initialized(); }

size_t nk_secure_used(void) { return CRYPTO_secure_used(); }

uintptr_t nk_secure_arena(void)
{
    void *probe = OPENSSL_secure_malloc(16);  /* the ordinary heap when there is no arena */
    uintptr_t at = probe != NULL && CRYPTO_secure_allocated(probe) ? (uintptr_t)probe : 0;
    OPENSSL_secure_free(probe);
    return at;
}

int nk_secure_lock(uintptr_t inside)
{
    FILE *maps = fopen("/proc/self/maps", "re");
    if (maps == NULL)
        return errno;
    unsigned long lo, hi;
    int rc = NK_ERR_INTERNAL;
    char line[4352];  /* a whole line: addresses, flags, offset, device, inode, PATH_MAX */
    while (fgets(line, sizeof line, maps) != NULL) {
        if (sscanf(line, "%lx-%lx", &lo, &hi) == 2 && lo <= inside && inside < hi) {
            rc = mlock((void *)lo, hi - lo) == 0 ? 0 : errno;
            break;
        }
    }
    fclose(maps);
    return rc;
}

const char *nk_openssl_version(void) { return OpenSSL_version(OPENSSL_VERSION); }

const char *nk_build_version(void) { return NOMYO_BUILD_VERSION; }

/* Refuse any key operation until the secure heap exists: without it OpenSSL's secure
 * allocations silently fall back to the ordinary heap. */
#define NEED_SECURE_HEAP() \
    do { if (!CRYPTO_secure_malloc_initialized()) return NK_ERR_SECURE_HEAP; } while (0)

/* One private number of `params` as a secure-heap BIGNUM (NULL when missing or on failure). */
static BIGNUM *secure_number(const OSSL_PARAM *params, const char *name)
{
    const OSSL_PARAM *p = OSSL_PARAM_locate_const(params, name);
    BIGNUM *bn = p != NULL ? BN_secure_new() : NULL;
    if (bn != NULL && !OSSL_PARAM_get_BN(p, &bn)) {
        BN_clear_free(bn);
        bn = NULL;
    }
    return bn;
}

/* `provided`'s numbers as a key of our own whose private operations keep no Montgomery
 * context of p or q. OpenSSL's RSA code caches one per prime in the key after the first
 * private operation, and BN_MONT_CTX_set copies the prime into an ordinary-heap BIGNUM: a
 * copy of p and of q for the key's lifetime. A provider's key offers no way to turn that
 * off; a key built from the numbers does (RSA_clear_flags), and its contexts are then made
 * per operation and freed with BN_clear_free. The numbers travel through EVP_PKEY_todata,
 * whose block is in the secure heap for secure numbers (and freed cleared), into secure
 * BIGNUMs. Measured: no window of p or q outside the arena after 20 decrypts, against one
 * of each with the provider's key; decrypt cost unchanged (bench/bench_keys.py). The key's
 * private numbers are then kept only in the arena; each operation's temporaries (a
 * Montgomery context, BN_CTX numbers) are ordinary heap, cleared when freed. */
static int uncached_key(EVP_PKEY *provided, EVP_PKEY **out)
{
    static const char *const private_names[] = {
        OSSL_PKEY_PARAM_RSA_D, OSSL_PKEY_PARAM_RSA_FACTOR1, OSSL_PKEY_PARAM_RSA_FACTOR2,
        OSSL_PKEY_PARAM_RSA_EXPONENT1, OSSL_PKEY_PARAM_RSA_EXPONENT2,
        OSSL_PKEY_PARAM_RSA_COEFFICIENT1,
    };
    OSSL_PARAM *params = NULL;
    BIGNUM *n = NULL, *e = NULL, *priv[6] = {NULL};
    RSA *rsa = NULL;
    EVP_PKEY *key = NULL;
    int rc = NK_ERR_INTERNAL;
    *out = NULL;
    if (EVP_PKEY_todata(provided, EVP_PKEY_KEYPAIR, &params) <= 0)
        goto done;
    if (OSSL_PARAM_locate_const(params, OSSL_PKEY_PARAM_RSA_FACTOR3) != NULL) {
        rc = NK_ERR_MULTI_PRIME;
        goto done;
    }
    n = BN_new();
    e = BN_new();
    if (n == NULL || e == NULL
        || !OSSL_PARAM_get_BN(OSSL_PARAM_locate_const(params, OSSL_PKEY_PARAM_RSA_N), &n)
        || !OSSL_PARAM_get_BN(OSSL_PARAM_locate_const(params, OSSL_PKEY_PARAM_RSA_E), &e))
        goto done;
    for (size_t i = 0; i < 6; i++)
        if ((priv[i] = secure_number(params, private_names[i])) == NULL)
            goto done;
    if ((rsa = RSA_new()) == NULL || (key = EVP_PKEY_new()) == NULL)
        goto done;
    if (!RSA_set0_key(rsa, n, e, priv[0]))
        goto done;
    n = e = priv[0] = NULL;
    if (!RSA_set0_factors(rsa, priv[1], priv[2]))
        goto done;
    priv[1] = priv[2] = NULL;
    if (!RSA_set0_crt_params(rsa, priv[3], priv[4], priv[5]))
        goto done;
    priv[3] = priv[4] = priv[5] = NULL;
    RSA_clear_flags(rsa, RSA_FLAG_CACHE_PRIVATE);
    if (!EVP_PKEY_assign_RSA(key, rsa))
        goto done;
    rsa = NULL;
    *out = key;
    key = NULL;
    rc = NK_OK;
done:
    for (size_t i = 0; i < 6; i++)
        BN_clear_free(priv[i]);
    BN_free(n);
    BN_free(e);
    RSA_free(rsa);
    EVP_PKEY_free(key);
    OSSL_PARAM_free(params);
    return rc;
}

int nk_generate(int bits, EVP_PKEY **out)
{
    NEED_SECURE_HEAP();
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_name(NULL, "RSA", NULL);
    int rc = NK_ERR_INTERNAL;
    *out = NULL;
    EVP_PKEY *made = NULL;
    if (ctx != NULL && EVP_PKEY_keygen_init(ctx) > 0
        && EVP_PKEY_CTX_set_rsa_keygen_bits(ctx, bits) > 0
        && EVP_PKEY_generate(ctx, &made) > 0)
        rc = uncached_key(made, out);
    EVP_PKEY_free(made);
    EVP_PKEY_CTX_free(ctx);
    ERR_clear_error();
    return rc;
}

/* The decoder's passphrase source when none was given: refuse, never prompt on a terminal. */
static int no_passphrase(char *buf, size_t size, size_t *len, const OSSL_PARAM params[], void *arg)
{
    (void)buf; (void)size; (void)params; (void)arg;
    *len = 0;
    return 0;
}

int nk_from_pem(const uint8_t *pem, size_t pem_len, const uint8_t *pw, size_t pw_len,
                EVP_PKEY **out)
{
    NEED_SECURE_HEAP();
    *out = NULL;
    int encrypted = memmem(pem, pem_len, "ENCRYPTED", 9) != NULL;
    if (pw_len > 0 && !encrypted)
        return NK_ERR_NOT_ENCRYPTED;
    /* a read-only memory BIO reads the caller's secure buffer in place (no copy) */
    BIO *in = BIO_new_mem_buf(pem, (int)pem_len);
    EVP_PKEY *decoded = NULL;
    OSSL_DECODER_CTX *dctx = OSSL_DECODER_CTX_new_for_pkey(&decoded, "PEM", NULL, "RSA",
                                                           EVP_PKEY_KEYPAIR, NULL, NULL);
    int rc = NK_ERR_INTERNAL;
    if (in != NULL && dctx != NULL) {
        int ok = pw_len > 0 ? OSSL_DECODER_CTX_set_passphrase(dctx, pw, pw_len)
                            : OSSL_DECODER_CTX_set_passphrase_cb(dctx, no_passphrase, NULL);
        if (ok) {
            if (OSSL_DECODER_from_bio(dctx, in) > 0 && decoded != NULL)
                rc = uncached_key(decoded, out);
            else
                rc = (encrypted && pw_len == 0) ? NK_ERR_NEED_PASSWORD : NK_ERR_DECODE;
        }
    }
    EVP_PKEY_free(decoded);
    OSSL_DECODER_CTX_free(dctx);
    BIO_free(in);
    ERR_clear_error();
    return rc;
}

void nk_free(EVP_PKEY *key) { EVP_PKEY_free(key); }  /* BN_clear_free's the private numbers */

int nk_bits(const EVP_PKEY *key) { return EVP_PKEY_get_bits(key); }

int nk_public_der(const EVP_PKEY *key, uint8_t *der, size_t *len)
{
    int n = i2d_PUBKEY(key, NULL);
    if (n <= 0)
        return NK_ERR_INTERNAL;
    if (der == NULL) {
        *len = (size_t)n;
        return NK_OK;
    }
    if (*len != (size_t)n)
        return NK_ERR_SIZE;
    unsigned char *p = der;
    return i2d_PUBKEY(key, &p) == n ? NK_OK : NK_ERR_INTERNAL;
}

int nk_decrypt(EVP_PKEY *key, const uint8_t *in, size_t in_len, uint8_t *out, size_t out_cap,
               size_t *out_len)
{
    NEED_SECURE_HEAP();
    /* The raw result and its OAEP decoding, each modulus-sized, in one secure block. The
     * private operation runs on the key's own RSA (not through a provider, which would use a
     * copy with the Montgomery cache on: see uncached_key). */
    RSA *rsa = key != NULL ? EVP_PKEY_get1_RSA(key) : NULL;
    int size = rsa != NULL ? RSA_size(rsa) : 0;
    unsigned char *scratch = size > 0 ? OPENSSL_secure_malloc(2 * (size_t)size) : NULL;
    int rc = NK_ERR_INTERNAL;
    *out_len = 0;
    if (scratch != NULL) {
        rc = NK_ERR_DECRYPT;
        if (in_len == (size_t)size) {
            int raw = RSA_private_decrypt(size, in, scratch, rsa, RSA_NO_PADDING);
            int n = raw == size
                    ? RSA_padding_check_PKCS1_OAEP_mgf1(scratch + size, size, scratch, raw,
                                                        size, NULL, 0, EVP_sha256(), NULL)
                    : -1;
            if (n >= 0 && (size_t)n > out_cap) {
                rc = NK_ERR_SIZE;
            } else if (n >= 0) {
                memcpy(out, scratch + size, (size_t)n);
                *out_len = (size_t)n;
                rc = NK_OK;
            }
        }
    }
    OPENSSL_secure_clear_free(scratch, 2 * (size_t)size);
    RSA_free(rsa);
    ERR_clear_error();
    return rc;
}

/* PKCS#8 through the key's own ASN.1 method (EVP_PKEY2PKCS8), not OSSL_ENCODER: an encoder
 * takes only a provider's key, and a provider copy of ours would hold its numbers in the
 * ordinary heap (EVP_PKEY_fromdata makes them with BN_new). The DER inside the PKCS#8
 * structures is ordinary heap, cleansed when they are freed. */
int nk_to_pem(EVP_PKEY *key, const uint8_t *pw, size_t pw_len, BIO **bio, size_t *len)
{
    NEED_SECURE_HEAP();
    *bio = NULL;
    *len = 0;
    if (key == NULL || pw_len > INT_MAX)
        return NK_ERR_INTERNAL;
    PKCS8_PRIV_KEY_INFO *p8 = EVP_PKEY2PKCS8(key);
    X509_SIG *sealed = NULL;
    int rc = NK_ERR_INTERNAL;
    *bio = BIO_new(BIO_s_secmem());
    if (p8 != NULL && *bio != NULL) {
        int ok;
        if (pw_len == 0) {
            ok = PEM_write_bio_PKCS8_PRIV_KEY_INFO(*bio, p8);
        } else {
            /* PBES2: AES-256-CBC, PBKDF2 with HMAC-SHA256, a random salt, default count */
            sealed = PKCS8_encrypt_ex(-1, EVP_aes_256_cbc(), (const char *)pw, (int)pw_len,
                                      NULL, 0, 0, p8, NULL, NULL);
            ok = sealed != NULL && PEM_write_bio_PKCS8(*bio, sealed);
        }
        if (ok) {
            *len = (size_t)BIO_pending(*bio);
            rc = NK_OK;
        }
    }
    X509_SIG_free(sealed);
    PKCS8_PRIV_KEY_INFO_free(p8);
    if (rc != NK_OK) {
        BIO_free(*bio);
        *bio = NULL;
    }
    ERR_clear_error();
    return rc;
}

int nk_bio_take(BIO *bio, uint8_t *dst, size_t len)
{
    int rc = (size_t)BIO_pending(bio) == len && BIO_read(bio, dst, (int)len) == (int)len
             ? NK_OK : NK_ERR_SIZE;
    BIO_free(bio);
    return rc;
}

void nk_bio_free(BIO *bio) { BIO_free(bio); }
