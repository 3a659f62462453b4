#ifndef CCURL_H
#define CCURL_H

/* Thin shim over libcurl. libcurl is loaded on first use (dlopen), not at start: a process that never talks to
 * an API server (--once from a file, status, plan, --help) does not load it and the 30-odd libraries it brings
 * (about 4 ms and 6.5 MiB of every start). Its functions are reached through `ccurl`, filled by ccurl_load;
 * curl_easy_setopt and curl_easy_getinfo are variadic, which Swift cannot call, so each option type gets a
 * typed wrapper. The header gives libcurl's types and constants only. Nothing else lives here. */

#include <curl/curl.h>
#include <stddef.h>

struct ccurl_functions {
    CURLcode (*global_init)(long flags);
    CURL *(*easy_init)(void);
    void (*easy_cleanup)(CURL *handle);
    CURLcode (*easy_perform)(CURL *handle);
    CURLcode (*easy_setopt)(CURL *handle, CURLoption option, ...);
    CURLcode (*easy_getinfo)(CURL *handle, CURLINFO info, ...);
    const char *(*easy_strerror)(CURLcode code);
    struct curl_slist *(*slist_append)(struct curl_slist *list, const char *string);
    void (*slist_free_all)(struct curl_slist *list);
};

/* libcurl's functions, once ccurl_load has returned NULL. */
extern struct ccurl_functions ccurl;

/* Loads libcurl.so.4 and runs curl_global_init, once per process (any thread): NULL when it is ready, else
 * what failed, in the dynamic loader's words. */
const char *ccurl_load(void);

typedef size_t (*ccurl_write_callback)(char *data, size_t size, size_t count, void *context);
typedef int (*ccurl_progress_callback)(void *context, curl_off_t dltotal, curl_off_t dlnow,
                                       curl_off_t ultotal, curl_off_t ulnow);

static inline CURL *ccurl_easy_init(void) { return ccurl.easy_init(); }
static inline void ccurl_easy_cleanup(CURL *c) { ccurl.easy_cleanup(c); }
static inline CURLcode ccurl_easy_perform(CURL *c) { return ccurl.easy_perform(c); }
static inline const char *ccurl_easy_strerror(CURLcode code) { return ccurl.easy_strerror(code); }
static inline struct curl_slist *ccurl_slist_append(struct curl_slist *l, const char *s) { return ccurl.slist_append(l, s); }
static inline void ccurl_slist_free_all(struct curl_slist *l) { ccurl.slist_free_all(l); }

static inline CURLcode ccurl_set_long(CURL *c, CURLoption o, long v) { return ccurl.easy_setopt(c, o, v); }
static inline CURLcode ccurl_set_string(CURL *c, CURLoption o, const char *v) { return ccurl.easy_setopt(c, o, v); }
static inline CURLcode ccurl_set_pointer(CURL *c, CURLoption o, void *v) { return ccurl.easy_setopt(c, o, v); }
static inline CURLcode ccurl_set_write_callback(CURL *c, ccurl_write_callback f) {
    return ccurl.easy_setopt(c, CURLOPT_WRITEFUNCTION, f);
}
static inline CURLcode ccurl_set_progress_callback(CURL *c, ccurl_progress_callback f) {
    return ccurl.easy_setopt(c, CURLOPT_XFERINFOFUNCTION, f);
}
/* A PEM blob (CA bundle, client certificate or key) held in memory; curl copies it. */
static inline CURLcode ccurl_set_blob(CURL *c, CURLoption o, const void *data, size_t length) {
    struct curl_blob blob = { .data = (void *)data, .len = length, .flags = CURL_BLOB_COPY };
    return ccurl.easy_setopt(c, o, &blob);
}
static inline long ccurl_response_code(CURL *c) {
    long code = 0;
    ccurl.easy_getinfo(c, CURLINFO_RESPONSE_CODE, &code);
    return code;
}

#endif
