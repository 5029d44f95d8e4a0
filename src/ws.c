/* ws.c - callagent.core.ws (placeholder until the module lands). */
#include "ca.h"

int luaopen_callagent_core_ws(lua_State *L)
{
	lua_newtable(L);
	return 1;
}
