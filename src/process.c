/* process.c - callagent.core.process (placeholder until the module lands). */
#include "ca.h"

int luaopen_callagent_core_process(lua_State *L)
{
	lua_newtable(L);
	return 1;
}
