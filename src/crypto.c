/* crypto.c - callagent.crypto (placeholder until the module lands). */
#include "ca.h"

int luaopen_callagent_crypto(lua_State *L)
{
	lua_newtable(L);
	return 1;
}
