#ifndef CCURL_H
#define CCURL_H

/* Thin shim over libcurl: curl_easy_setopt and curl_easy_getinfo are variadic, which Swift cannot
 * call, so each option type gets a typed wrapper. Nothing else lives here. */

#include <curl/curl.h>
#include <stddef.h>

typedef size_t (*ccurl_write_callback)(char *data, size_t size, size_t count, void *context);
typedef int (*ccurl_progress_callback)(void *context, curl_off_t dltotal, curl_off_t dlnow,
                                       curl_off_t ultotal, curl_off_t ulnow);

static inline CURLcode ccurl_set_long(CURL *c, CURLoption o, long v) { return curl_easy_setopt(c, o, v); }
static inline CURLcode ccurl_set_string(CURL *c, CURLoption o, const char *v) { return curl_easy_setopt(c, o, v); }
static inline CURLcode ccurl_set_pointer(CURL *c, CURLoption o, void *v) { return curl_easy_setopt(c, o, v); }
static inline CURLcode ccurl_set_write_callback(CURL *c, ccurl_write_callback f) {
    return curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, f);
}
static inline CURLcode ccurl_set_progress_callback(CURL *c, ccurl_progress_callback f) {
    return curl_easy_setopt(c, CURLOPT_XFERINFOFUNCTION, f);
}
/* A PEM blob (CA bundle, client certificate or key) held in memory; curl copies it. */
static inline CURLcode ccurl_set_blob(CURL *c, CURLoption o, const void *data, size_t length) {
    struct curl_blob blob = { .data = (void *)data, .len = length, .flags = CURL_BLOB_COPY };
    return curl_easy_setopt(c, o, &blob);
}
static inline long ccurl_response_code(CURL *c) {
    long code = 0;
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &code);
    return code;
}

#endif
