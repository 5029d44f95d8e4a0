/* fetch.c - callagent.core.fetch (placeholder until the module lands). */
#include "ca.h"

int luaopen_callagent_core_fetch(lua_State *L)
{
	lua_newtable(L);
	return 1;
}
