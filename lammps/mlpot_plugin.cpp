// Registers pair_style mlpot with LAMMPS when the plugin is loaded (plugin load, or LAMMPS_PLUGIN_PATH).
// SPDX-License-Identifier: GPL-2.0-or-later  (see LICENSE.md in this folder)

#include "lammps.h"
#include "pair_mlpot.h"

using namespace LAMMPS_NS;

// LAMMPS's plugin interface (src/PLUGIN/lammpsplugin.h, not shipped with the wheel's headers): a C struct
// handed to the register function that LAMMPS passes to lammpsplugin_init
extern "C" {
typedef void *(plugin_factory)(void *);
struct plugin_info {
  const char *version;
  const char *style;
  const char *name;
  const char *info;
  const char *author;
  union {
    plugin_factory *v1;
    void *v2;
  } creator;
  void *handle;
};
typedef void (*plugin_register)(plugin_info *, void *);

void lammpsplugin_init(void *lmp, void *handle, void *regfunc)
{
  plugin_info plugin{};
  // LAMMPS compares this with its own version string: built against the running LAMMPS's headers
  plugin.version = static_cast<LAMMPS *>(lmp)->version;
  plugin.style = "pair";
  plugin.name = "mlpot";
  plugin.info = "mlpot deployed TorchScript models (pair_style mlpot MODEL.pt)";
  plugin.author = "mlpot developers";
  plugin.creator.v1 = [](void *lmp) -> void * { return new PairMLPot(static_cast<LAMMPS *>(lmp)); };
  plugin.handle = handle;
  reinterpret_cast<plugin_register>(regfunc)(&plugin, lmp);
}
}
