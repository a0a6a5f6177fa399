/*
 * sockaddr.c -- see sockaddr.h.
 */
#include <stdio.h>
#include <netinet/in.h>
#include <arpa/inet.h>

#include "sockaddr.h"

const char *
gw_sockaddr_text(const struct sockaddr_storage *sa, char *buf, size_t len)
{
    char ip[INET6_ADDRSTRLEN];

    if (sa->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *) sa;

        if (inet_ntop(AF_INET, &a->sin_addr, ip, sizeof(ip)) == NULL) {
            return NULL;
        }
        snprintf(buf, len, "%s:%u", ip, (unsigned) ntohs(a->sin_port));
        return buf;
    }
    if (sa->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *) sa;

        if (inet_ntop(AF_INET6, &a->sin6_addr, ip, sizeof(ip)) == NULL) {
            return NULL;
        }
        snprintf(buf, len, "[%s]:%u", ip, (unsigned) ntohs(a->sin6_port));
        return buf;
    }
    return NULL;
}
