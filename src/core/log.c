/*
 * log.c -- JSON-lines logger. See log.h.
 */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "log.h"

enum gw_log_level gw_log_min = GW_LOG_INFO;

static const char *const level_names[] = { "debug", "info", "warn", "error" };

int
gw_log_parse_level(const char *s, enum gw_log_level *out)
{
    for (int i = 0; i < 4; i++) {
        if (strcmp(s, level_names[i]) == 0) {
            *out = (enum gw_log_level) i;
            return GW_OK;
        }
    }
    return GW_ERR;
}

/* Length of the valid UTF-8 sequence at s[0..len), or 0 if none (overlong
 * forms, surrogates and code points past U+10FFFF are invalid). */
static size_t
utf8_seq(const unsigned char *s, size_t len)
{
    size_t n;
    unsigned cp, min;

    if (s[0] >= 0xc2 && s[0] <= 0xdf) {
        n = 2, cp = s[0] & 0x1fu, min = 0x80;
    } else if (s[0] >= 0xe0 && s[0] <= 0xef) {
        n = 3, cp = s[0] & 0x0fu, min = 0x800;
    } else if (s[0] >= 0xf0 && s[0] <= 0xf4) {
        n = 4, cp = s[0] & 0x07u, min = 0x10000;
    } else {
        return 0;
    }
    if (len < n) {
        return 0;
    }
    for (size_t i = 1; i < n; i++) {
        if ((s[i] & 0xc0) != 0x80) {
            return 0;
        }
        cp = (cp << 6) | (s[i] & 0x3fu);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) {
        return 0;
    }
    return n;
}

size_t
gw_utf8_seq(const unsigned char *s, size_t len)
{
    if (len == 0) {
        return 0;
    }
    return s[0] < 0x80 ? 1 : utf8_seq(s, len);
}

size_t
gw_json_quote(char *buf, size_t cap, const char *s, size_t len)
{
    static const char hex[] = "0123456789abcdef";
    size_t n = 0;

    if (cap < 2) {
        return 0;
    }
    buf[n++] = '"';
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char) s[i];

        if (n + 7 >= cap) {
            return 0;
        }
        if (c == '"' || c == '\\') {
            buf[n++] = '\\';
            buf[n++] = (char) c;
        } else if (c == '\n') {
            buf[n++] = '\\';
            buf[n++] = 'n';
        } else if (c == '\t') {
            buf[n++] = '\\';
            buf[n++] = 't';
        } else if (c < 0x20 || c == 0x7f) {
            buf[n++] = '\\';
            buf[n++] = 'u';
            buf[n++] = '0';
            buf[n++] = '0';
            buf[n++] = hex[c >> 4];
            buf[n++] = hex[c & 15];
        } else if (c < 0x80) {
            buf[n++] = (char) c;
        } else {
            /* JSON is UTF-8: a byte that does not start a valid sequence
             * (a client's path, a handler's binary message) becomes
             * U+FFFD instead of making the whole line unparseable */
            size_t k = utf8_seq((const unsigned char *) s + i, len - i);

            if (k == 0) {
                memcpy(buf + n, "\\ufffd", 6);
                n += 6;
            } else {
                memcpy(buf + n, s + i, k);
                n += k;
                i += k - 1;
            }
        }
    }
    if (n + 1 >= cap) {
        return 0;
    }
    buf[n++] = '"';
    return n;
}

void
gw_log_line(enum gw_log_level level, const char *request_id,
            const char *msg, size_t msg_len, const char *fields_json,
            size_t fields_len)
{
    char buf[16384];
    struct timeval tv;
    struct tm tm;
    size_t n, q, room;
    int w;

    if (level < gw_log_min) {
        return;
    }
    gettimeofday(&tv, NULL);
    gmtime_r(&tv.tv_sec, &tm);
    w = snprintf(buf, sizeof(buf),
                 "{\"ts\":\"%04d-%02d-%02dT%02d:%02d:%02d.%03dZ\","
                 "\"level\":\"%s\",\"pid\":%d",
                 tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour,
                 tm.tm_min, tm.tm_sec, (int) (tv.tv_usec / 1000),
                 level_names[level], (int) getpid());
    n = (size_t) w;
    if (request_id != NULL) {
        memcpy(buf + n, ",\"request_id\":", 14);
        n += 14;
        q = gw_json_quote(buf + n, 200, request_id, strlen(request_id));
        n += q;
    }
    memcpy(buf + n, ",\"msg\":", 7);
    n += 7;
    if (msg_len > 4096) {
        msg_len = 4096;     /* a runaway message must not hide the line */
    }
    /* quoted, a byte may take 6 (a control byte, one not UTF-8): the
     * message is cut until it fits rather than lost, in half the line
     * when fields follow (the other half is theirs) */
    room = (fields_json != NULL && fields_len > 2 ? sizeof(buf) / 2
                                                  : sizeof(buf) - 128) - n;
    while ((q = gw_json_quote(buf + n, room, msg, msg_len)) == 0) {
        msg_len /= 2;
    }
    n += q;
    /* fields_json is "{...}": splice its members in. Fields too long for
     * the line (paygate.log shortens long values first) are said to be
     * missing, never dropped without a word. */
    if (fields_json != NULL && fields_len > 2 && fields_json[0] == '{'
        && n + fields_len + 2 < sizeof(buf)) {
        buf[n++] = ',';
        memcpy(buf + n, fields_json + 1, fields_len - 1);
        n += fields_len - 1;
    } else if (fields_json != NULL && fields_len > 2) {
        n += (size_t) snprintf(buf + n, sizeof(buf) - n,
                               ",\"fields_dropped\":\"%zu bytes of fields "
                               "past the line's %zu\"}", fields_len,
                               sizeof(buf));
    } else {
        buf[n++] = '}';
    }
    buf[n++] = '\n';
    if (write(STDERR_FILENO, buf, n) < 0) {
        /* nowhere left to report it */
    }
}

void
gw_log(enum gw_log_level level, const char *fmt, ...)
{
    char msg[4096];
    va_list ap;
    int n;

    if (level < gw_log_min) {
        return;
    }
    va_start(ap, fmt);
    n = vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (n < 0) {
        return;
    }
    if ((size_t) n >= sizeof(msg)) {
        n = sizeof(msg) - 1;
    }
    gw_log_line(level, NULL, msg, (size_t) n, NULL, 0);
}
