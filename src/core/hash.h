/*
 * hash.h -- the one non-cryptographic string hash (32-bit FNV-1a) for the
 * runtime's in-memory tables (statement caches, key rings). Not for
 * anything an attacker picks to collide on purpose with a cost to us
 * beyond a longer probe: tables that hold outside input seed their own.
 */
#ifndef GW_HASH_H
#define GW_HASH_H

#include <stddef.h>
#include <stdint.h>

static inline uint32_t
gw_hash_fnv1a(const void *p, size_t len)
{
    const unsigned char *s = p;
    uint32_t h = 2166136261u;

    for (size_t i = 0; i < len; i++) {
        h = (h ^ s[i]) * 16777619u;
    }
    return h;
}

#endif
