/* The "one .c file" way to use bncore.h: this translation unit holds the
 * implementation; every other file includes bncore.h plainly. */
#define BNCORE_IMPLEMENTATION
#include "bncore.h"
