/*
 * log.h -- structured JSON-lines logging on stderr.
 *
 * One line per event: {"ts":..,"level":..,"pid":..,"msg":..,...}. Lines are
 * written with a single write(2) so lines from several workers sharing
 * stderr never interleave. Callers never pass secrets or bodies.
 */
#ifndef GW_LOG_H
#define GW_LOG_H

#include <stddef.h>
#include "runtime.h"

/* Messages below this level are dropped before formatting. */
extern enum gw_log_level gw_log_min;

/* Parses "debug"/"info"/"warn"/"error"; GW_ERR on anything else. */
int gw_log_parse_level(const char *s, enum gw_log_level *out);

/* Writes one line. request_id may be NULL; fields_json, when not NULL, is
 * a JSON object text whose members are appended to the line. */
void gw_log_line(enum gw_log_level level, const char *request_id,
                 const char *msg, size_t msg_len, const char *fields_json,
                 size_t fields_len);

/* Length of the valid UTF-8 sequence at s[0..len) (1 for ASCII), or 0 if
 * none: overlong forms, surrogates and code points past U+10FFFF are not
 * valid. */
size_t gw_utf8_seq(const unsigned char *s, size_t len);

/* Appends s as a JSON string (with quotes) to buf; returns bytes written,
 * or 0 when cap is too small (buf content then undefined). */
size_t gw_json_quote(char *buf, size_t cap, const char *s, size_t len);

#endif
