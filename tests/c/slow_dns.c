/*
 * slow_dns.c - an LD_PRELOAD shim for tests: a DNS that is slow or down,
 * without a DNS server. getaddrinfo() for a name ending in ".slow.test"
 * answers 127.0.0.1 after SLOW_DNS_MS (default 400) ms; for one ending in
 * ".fail.test" it fails (EAI_NONAME) after the same wait. Other names go to
 * the real getaddrinfo.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netdb.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int ends_with(const char *s, const char *tail)
{
	size_t n = strlen(s), t = strlen(tail);

	return n >= t && strcmp(s + n - t, tail) == 0;
}

static void wait_ms(void)
{
	const char *v = getenv("SLOW_DNS_MS");
	long ms = v ? atol(v) : 400;
	struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};

	while (nanosleep(&ts, &ts) != 0)
		;
}

int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints,
		struct addrinfo **res)
{
	int (*real)(const char *, const char *, const struct addrinfo *, struct addrinfo **) =
		(int (*)(const char *, const char *, const struct addrinfo *, struct addrinfo **))
			dlsym(RTLD_NEXT, "getaddrinfo");

	if (node && ends_with(node, ".slow.test")) {
		wait_ms();
		return real("127.0.0.1", service, hints, res);
	}
	if (node && ends_with(node, ".fail.test")) {
		wait_ms();
		return EAI_NONAME;
	}
	return real(node, service, hints, res);
}
