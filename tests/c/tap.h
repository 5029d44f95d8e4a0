/*
 * tap.h - the smallest test harness: TAP lines the runner counts.
 *
 *   CHECK(cond, "name %d", i)   one test point
 *   return tap_done();          from main: 0 when all passed
 */
#ifndef TAP_H
#define TAP_H

#include <stdio.h>

static int tap_n, tap_failed;

#define CHECK(cond, ...) do { \
	int ok_ = (cond) ? 1 : 0; \
	printf("%s %d - ", ok_ ? "ok" : "not ok", ++tap_n); \
	printf(__VA_ARGS__); \
	printf("\n"); \
	if (!ok_) { \
		tap_failed++; \
		printf("# failed at %s:%d: %s\n", __FILE__, __LINE__, #cond); \
	} \
} while (0)

static inline int tap_done(void)
{
	printf("1..%d\n", tap_n);
	return tap_failed ? 1 : 0;
}

#endif
