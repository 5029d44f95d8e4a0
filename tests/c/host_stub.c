/*
 * host_stub.c - the few host functions main.c provides, for C unit tests
 * that link the module objects without the program around them.
 */
#include "ca.h"

uv_loop_t *ca_loop(void)
{
	return NULL;
}

lua_State *ca_lua(void)
{
	return NULL;
}

int ca_stopping(void)
{
	return 0;
}

void ca__at_close(void (*fn)(void))
{
	(void)fn;
}

void ca__abandonable(int delta)
{
	(void)delta;
}
