/* http.c - callagent.core.http (placeholder until the module lands). */
#include "ca.h"

int luaopen_callagent_core_http(lua_State *L)
{
	lua_newtable(L);
	return 1;
}
