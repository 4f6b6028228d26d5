/* osslkey: RSA private keys held by OpenSSL 3's secure heap (CRYPTO_secure_malloc_init: one
 * mlocked, guarded, dump-excluded arena), so that d, p, q, dp, dq and qinv are kept nowhere
 * else. OpenSSL's own temporaries during an operation (BN_CTX numbers, a per-operation
 * Montgomery context, OAEP's unmasking buffers, PEM's DER) are ordinary heap, cleared when
 * freed. Every call returns 0 or an NK_ERR_* code; nothing secret is ever returned in
 * ordinary memory. The block between the cdef markers is read by build_osslkey.py.
 *
 * A key from here is a legacy RSA key (see uncached_key in osslkey.c): never hand it to an
 * EVP_PKEY_CTX or an OSSL_ENCODER, which would export a provider copy of it, with ordinary-
 * heap numbers, for the key's lifetime.
 */
#ifndef NOMYO_OSSLKEY_H
#define NOMYO_OSSLKEY_H

#include <stddef.h>
#include <stdint.h>

/* cdef-begin */
#define NK_OK 0
#define NK_ERR_INTERNAL -1      /* an OpenSSL failure not caused by the input */
#define NK_ERR_DECRYPT -2       /* OAEP decrypt refused the wrapped key: the integrity verdict */
#define NK_ERR_DECODE -3        /* not a PEM RSA private key, or the wrong password */
#define NK_ERR_NEED_PASSWORD -4 /* the PEM is encrypted and no password was given */
#define NK_ERR_NOT_ENCRYPTED -5 /* a password was given for a PEM that is not encrypted */
#define NK_ERR_SIZE -6          /* an output buffer of the wrong size */
#define NK_ERR_SECURE_HEAP -7   /* the secure heap is not initialised */
#define NK_ERR_MULTI_PRIME -8   /* a multi-prime RSA key: not made or accepted here */

typedef struct evp_pkey_st EVP_PKEY;
typedef struct bio_st BIO;

/* CRYPTO_secure_malloc_init(size, minsize) once per process; 1 on success or already done,
 * 2 when it worked without mlock (see OpenSSL's docs), 0 when it failed. */
int nk_secure_init(size_t size, size_t minsize);
int nk_secure_initialized(void);
/* An address inside the secure heap's arena (a block allocated and freed at once): the
 * arena never moves, so a forked child can find its mapping without taking OpenSSL's lock. */
uintptr_t nk_secure_arena(void);
/* mlock the whole mapping holding `inside` again (locks are not inherited across fork): 0,
 * the errno of the failed mlock, or NK_ERR_INTERNAL when no mapping holds it. */
int nk_secure_lock(uintptr_t inside);
size_t nk_secure_used(void);
const char *nk_openssl_version(void);
const char *nk_build_version(void);

int nk_generate(int bits, EVP_PKEY **out);
int nk_from_pem(const uint8_t *pem, size_t pem_len, const uint8_t *pw, size_t pw_len,
                EVP_PKEY **out);
void nk_free(EVP_PKEY *key);
int nk_bits(const EVP_PKEY *key);
/* DER SubjectPublicKeyInfo of the public half (no secret): *len first with der NULL. */
int nk_public_der(const EVP_PKEY *key, uint8_t *der, size_t *len);
/* RSA-OAEP(SHA-256, MGF1-SHA-256) decrypt into out (out_cap bytes); *out_len is set. The
 * modulus-sized result is built in a secure-heap scratch buffer, cleared before it is freed. */
int nk_decrypt(EVP_PKEY *key, const uint8_t *in, size_t in_len, uint8_t *out, size_t out_cap,
               size_t *out_len);
/* PKCS#8 PEM (PBES2 AES-256-CBC when pw_len > 0) into a secure-memory BIO; *len its size. */
int nk_to_pem(EVP_PKEY *key, const uint8_t *pw, size_t pw_len, BIO **bio, size_t *len);
/* Copy len bytes of the BIO into dst, then free the BIO (its buffer is cleared). */
int nk_bio_take(BIO *bio, uint8_t *dst, size_t len);
void nk_bio_free(BIO *bio);
/* cdef-end */

#endif
