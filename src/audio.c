/* audio.c - callagent.audio (placeholder until the module lands). */
#include "ca.h"

int luaopen_callagent_audio(lua_State *L)
{
	lua_newtable(L);
	return 1;
}
