/* osslkey: RSA private keys in OpenSSL 3's secure heap; see osslkey.h. */
#define _GNU_SOURCE
#include "osslkey.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

#include <openssl/bio.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/decoder.h>
#include <openssl/encoder.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/opensslv.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#if OPENSSL_VERSION_MAJOR < 3
#error "osslkey needs OpenSSL 3 (OSSL_DECODER, OSSL_ENCODER, BIO_s_secmem)"
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

int nk_generate(int bits, EVP_PKEY **out)
{
    NEED_SECURE_HEAP();
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_name(NULL, "RSA", NULL);
    int rc = NK_ERR_INTERNAL;
    *out = NULL;
    if (ctx != NULL && EVP_PKEY_keygen_init(ctx) > 0
        && EVP_PKEY_CTX_set_rsa_keygen_bits(ctx, bits) > 0
        && EVP_PKEY_generate(ctx, out) > 0)
        rc = NK_OK;
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
    OSSL_DECODER_CTX *dctx = OSSL_DECODER_CTX_new_for_pkey(out, "PEM", NULL, "RSA",
                                                           EVP_PKEY_KEYPAIR, NULL, NULL);
    int rc = NK_ERR_INTERNAL;
    if (in != NULL && dctx != NULL) {
        int ok = pw_len > 0 ? OSSL_DECODER_CTX_set_passphrase(dctx, pw, pw_len)
                            : OSSL_DECODER_CTX_set_passphrase_cb(dctx, no_passphrase, NULL);
        if (ok) {
            if (OSSL_DECODER_from_bio(dctx, in) > 0 && *out != NULL)
                rc = NK_OK;
            else
                rc = (encrypted && pw_len == 0) ? NK_ERR_NEED_PASSWORD : NK_ERR_DECODE;
        }
    }
    if (rc != NK_OK && *out != NULL) {
        EVP_PKEY_free(*out);
        *out = NULL;
    }
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
    size_t scratch_len = (size_t)EVP_PKEY_get_size(key);
    unsigned char *scratch = OPENSSL_secure_malloc(scratch_len);
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_pkey(NULL, key, NULL);
    int rc = NK_ERR_INTERNAL;
    *out_len = 0;
    if (scratch != NULL && ctx != NULL && EVP_PKEY_decrypt_init(ctx) > 0
        && EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_OAEP_PADDING) > 0
        && EVP_PKEY_CTX_set_rsa_oaep_md_name(ctx, "SHA256", NULL) > 0
        && EVP_PKEY_CTX_set_rsa_mgf1_md_name(ctx, "SHA256", NULL) > 0) {
        size_t n = scratch_len;
        if (EVP_PKEY_decrypt(ctx, scratch, &n, in, in_len) > 0) {
            if (n <= out_cap) {
                memcpy(out, scratch, n);
                *out_len = n;
                rc = NK_OK;
            } else {
                rc = NK_ERR_SIZE;
            }
        } else {
            rc = NK_ERR_DECRYPT;
        }
    }
    EVP_PKEY_CTX_free(ctx);
    OPENSSL_secure_clear_free(scratch, scratch_len);
    ERR_clear_error();
    return rc;
}

int nk_to_pem(EVP_PKEY *key, const uint8_t *pw, size_t pw_len, BIO **bio, size_t *len)
{
    NEED_SECURE_HEAP();
    *bio = BIO_new(BIO_s_secmem());
    *len = 0;
    OSSL_ENCODER_CTX *ectx = OSSL_ENCODER_CTX_new_for_pkey(key, EVP_PKEY_KEYPAIR, "PEM",
                                                           "PrivateKeyInfo", NULL);
    int rc = NK_ERR_INTERNAL;
    if (*bio != NULL && ectx != NULL && OSSL_ENCODER_CTX_get_num_encoders(ectx) > 0
        && (pw_len == 0 || (OSSL_ENCODER_CTX_set_cipher(ectx, "AES-256-CBC", NULL)
                            && OSSL_ENCODER_CTX_set_passphrase(ectx, pw, pw_len)))
        && OSSL_ENCODER_to_bio(ectx, *bio) > 0) {
        *len = (size_t)BIO_pending(*bio);
        rc = NK_OK;
    }
    OSSL_ENCODER_CTX_free(ectx);
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
