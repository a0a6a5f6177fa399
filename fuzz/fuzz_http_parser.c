/*
 * fuzz_http_parser.c -- the request parser and the chunked decoder, fed
 * hostile bytes. Properties checked beyond "no crash": finding the head's
 * end incrementally (in two pieces) agrees with finding it at once; every
 * parsed field lies inside the head (a refused head's method too, when
 * known, whether refused whole or early, and the same method both ways);
 * the chunked decoder never writes past what it read.
 */
#include <assert.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "http_parser.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void
inside(const char *base, size_t len, const char *p, size_t n)
{
    if (n > 0) {
        assert(p >= base && p + n <= base + len);
    }
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *buf = (const char *) data;
    size_t scanned = 0, scanned2 = 0, end, end2, split;
    struct gw_http_head *h, eh;
    int erc;

    if (size == 0) {
        return 0;
    }
    end = gw_http_head_end(buf, size, &scanned);
    split = data[0] % size;
    end2 = gw_http_head_end(buf, split, &scanned2);
    if (end2 == 0) {
        end2 = gw_http_head_end(buf, size, &scanned2);
    }
    assert(end == end2);
    if (end == 0) {
        return 0;
    }
    {
        size_t at = 0, m = gw_http_method_of(buf, size, &at);

        assert(m <= 20);
        if (m > 0) {
            inside(buf, size, buf + at, m);
        }
    }
    erc = gw_http_head_early(buf, size, data[0] % size, &eh);
    if (erc == 0) {
        assert(eh.method_len == 0 && eh.refusal == NULL);
    } else if (eh.method_len > 0) {
        /* the server counts and logs an early refused head's method */
        assert(eh.method_len <= 20);
        inside(buf, size, eh.method, eh.method_len);
    }
    h = malloc(sizeof(*h) + 64 * sizeof(struct gw_http_header));
    if (h == NULL) {
        return 0;
    }
    h->headers = (struct gw_http_header *) (h + 1);
    h->max_headers = 64;
    if (gw_http_parse_head(buf, end, h) == 0) {
        /* a head the full parse takes was never refused early, at any
         * cut before its end, whatever was scanned before */
        for (size_t cut = 1; cut < end; cut += 1 + cut / 16) {
            size_t sc = 0;

            if (gw_http_head_end(buf, cut, &sc) == 0) {
                assert(gw_http_head_early(buf, cut, 0, &eh) == 0);
                assert(gw_http_head_early(buf, cut, split % cut, &eh)
                       == 0);
            }
        }
        inside(buf, end, h->method, h->method_len);
        inside(buf, end, h->target, h->target_len);
        if (!h->path_outside) {
            inside(buf, end, h->path, h->path_len);
        }
        if (h->path_len > 0 && h->path[0] == '/') {
            char *out = malloc(h->path_len);
            size_t n;

            if (out != NULL && gw_http_path_resolve(h->path, h->path_len,
                                                    out, &n) == 0) {
                assert(n >= 1 && n <= h->path_len && out[0] == '/');
            }
            free(out);
        }
        if (h->query != NULL) {
            inside(buf, end, h->query, h->query_len);
        }
        for (size_t i = 0; i < h->nheaders; i++) {
            inside(buf, end, h->headers[i].name, h->headers[i].name_len);
            inside(buf, end, h->headers[i].value, h->headers[i].value_len);
        }
        if (h->chunked) {
            size_t blen = size - end;
            char *body = malloc(blen + 1);
            struct gw_chunked st;
            int rc;

            if (body != NULL) {
                memcpy(body, buf + end, blen);
                memset(&st, 0, sizeof(st));
                rc = gw_chunked_decode(&st, body, blen);
                assert(rc >= -1 && rc <= 1);
                assert(st.out <= st.in && st.in <= blen);
                free(body);
            }
        }
        assert(h->refusal == NULL);
    } else {
        if (h->method_len > 0) {
            /* the server counts and logs a refused head's method */
            assert(h->method_len <= 20);
            inside(buf, end, h->method, h->method_len);
        }
        /* refused early too: told the same method */
        if (erc != 0) {
            assert(eh.method_len == h->method_len);
            assert(eh.method_len == 0 || eh.method == h->method);
        }
    }
    free(h);
    return 0;
}
