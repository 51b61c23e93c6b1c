// pair_style mlpot: a deployed mlpot TorchScript model as a LAMMPS pair style (plugin).
// SPDX-License-Identifier: GPL-2.0-or-later  (see LICENSE.md in this folder)
//
// Each rank feeds its local and ghost atoms to the model as one graph with zero shifts. The ghost
// shell reaches num_layers x cutoff (+ skin; GCN one cutoff more), so every atom within (num_layers - 1)
// x cutoff of a local atom has its full neighbourhood and every local atom's energy is exact. Only local atoms'
// energies are summed; forces on all atoms come from autograd of that sum and LAMMPS sends the ghost
// atoms' forces back to their owners (newton pair on). The virial is -sum over edges of r_ij (x)
// dE/dr_ij, taken from the gradient of the (zero) edge shifts, which equal dE/dr_ij.

#include "pair_mlpot.h"

#include "atom.h"
#include "comm.h"
#include "domain.h"
#include "error.h"
#include "force.h"
#include "json.h"
#include "memory.h"
#include "neigh_list.h"
#include "neighbor.h"
#include "update.h"
#include "utils.h"

#include <torch/csrc/jit/runtime/graph_executor.h>

#include <cmath>
#include <cstring>

using namespace LAMMPS_NS;

namespace {

const char *const SYMBOLS[] = {
    "H",  "He", "Li", "Be", "B",  "C",  "N",  "O",  "F",  "Ne", "Na", "Mg", "Al", "Si", "P",  "S",
    "Cl", "Ar", "K",  "Ca", "Sc", "Ti", "V",  "Cr", "Mn", "Fe", "Co", "Ni", "Cu", "Zn", "Ga", "Ge",
    "As", "Se", "Br", "Kr", "Rb", "Sr", "Y",  "Zr", "Nb", "Mo", "Tc", "Ru", "Rh", "Pd", "Ag", "Cd",
    "In", "Sn", "Sb", "Te", "I",  "Xe", "Cs", "Ba", "La", "Ce", "Pr", "Nd", "Pm", "Sm", "Eu", "Gd",
    "Tb", "Dy", "Ho", "Er", "Tm", "Yb", "Lu", "Hf", "Ta", "W",  "Re", "Os", "Ir", "Pt", "Au", "Hg",
    "Tl", "Pb", "Bi", "Po", "At", "Rn", "Fr", "Ra", "Ac", "Th", "Pa", "U",  "Np", "Pu", "Am", "Cm",
    "Bk", "Cf", "Es", "Fm", "Md", "No", "Lr", "Rf", "Db", "Sg", "Bh", "Hs", "Mt", "Ds", "Rg", "Cn",
    "Nh", "Fl", "Mc", "Lv", "Ts", "Og"};
const int NUM_SYMBOLS = sizeof(SYMBOLS) / sizeof(SYMBOLS[0]);

// atomic number of an element symbol, 0 when there is none
int atomic_number(const std::string &symbol)
{
  for (int z = 1; z <= NUM_SYMBOLS; z++)
    if (symbol == SYMBOLS[z - 1]) return z;
  return 0;
}

std::string species_names(const std::vector<int> &species)
{
  std::string names;
  for (int z : species) names += (names.empty() ? "" : " ") + std::string(SYMBOLS[z - 1]);
  return names;
}

}    // namespace

PairMLPot::PairMLPot(LAMMPS *lmp) : Pair(lmp)
{
  single_enable = 0;
  restartinfo = 0;
  one_coeff = 1;
  manybody_flag = 1;
  ghostneigh = 1;                  // edges of ghost atoms too: the graph spans local + ghost atoms
  no_virial_fdotr_compute = 1;     // the virial comes from the edges (see compute)
  centroidstressflag = CENTROID_NOTAVAIL;
}

PairMLPot::~PairMLPot()
{
  if (allocated) {
    memory->destroy(setflag);
    memory->destroy(cutsq);
    memory->destroy(cutghost);
  }
}

void PairMLPot::allocate()
{
  allocated = 1;
  const int n = atom->ntypes + 1;
  memory->create(setflag, n, n, "pair:setflag");
  memory->create(cutsq, n, n, "pair:cutsq");
  memory->create(cutghost, n, n, "pair:cutghost");
  for (int i = 0; i < n; i++)
    for (int j = 0; j < n; j++) setflag[i][j] = 0;
}

// pair_style mlpot MODEL.pt [float32|float64]
void PairMLPot::settings(int narg, char **arg)
{
  if (narg < 1 || narg > 2)
    error->all(FLERR, "Illegal pair_style mlpot command: use pair_style mlpot MODEL.pt [float32|float64]");
  load_model(arg[0], narg == 2 ? arg[1] : "");
}

void PairMLPot::load_model(const std::string &path, const std::string &dtype)
{
  if (!dtype.empty() && dtype != "float32" && dtype != "float64")
    error->all(FLERR, "pair_style mlpot: unknown precision {}; use float32 or float64", dtype);
  // TorchScript's profiling optimiser spends seconds on the first calls and again on every new shape (the
  // graph changes size at each neighbour-list rebuild), for no gain on these models: run them as compiled
  torch::jit::setGraphExecutorOptimize(false);
  torch::jit::ExtraFilesMap extra{{"mlpot.json", ""}};
  try {
    model_ = torch::jit::load(path, torch::kCPU, extra);
  } catch (const std::exception &err) {
    std::string what = err.what();
    error->all(FLERR, "pair_style mlpot: cannot load {} as a deployed mlpot TorchScript file ({}); "
               "deploy one with: mlpot-deploy CHECKPOINT -o MODEL.pt", path, what.substr(0, what.find('\n')));
  }
  if (extra["mlpot.json"].empty())
    error->all(FLERR, "pair_style mlpot: {} is a TorchScript file but not an mlpot model (no mlpot.json metadata)",
               path);
  std::string kind, file_dtype;
  try {
    const auto meta = json::parse(extra["mlpot.json"]);
    if (meta.value("format", std::string("torchscript")) != "torchscript")
      error->all(FLERR, "pair_style mlpot: {} is a compiled ({}) file; give its TorchScript .pt file", path,
                 meta.value("format", std::string()));
    kind = meta.at("kind").get<std::string>();
    species_ = meta.at("species").get<std::vector<int>>();
    cutoff_ = meta.at("cutoff").get<double>();
    file_dtype = meta.at("dtype").get<std::string>();
    // the models' own default is 3 layers (mlpot/models: gcn, schnet, egnn)
    num_layers_ = meta.contains("hparams") ? meta["hparams"].value("num_layers", 3) : 3;
    // a GCN layer also weights each message by its sender's degree, which depends on the sender's own
    // neighbours: one cutoff further per model
    reach_ = num_layers_ + (kind == "gcn" ? 1 : 0);
  } catch (const json::exception &err) {
    error->all(FLERR, "pair_style mlpot: {} has unreadable mlpot metadata ({})", path, err.what());
  }
  for (int z : species_)
    if (z < 1 || z > NUM_SYMBOLS) error->all(FLERR, "pair_style mlpot: {} lists atomic number {}", path, z);
  if (cutoff_ <= 0.0 || num_layers_ < 1)
    error->all(FLERR, "pair_style mlpot: {} has cutoff {} and {} layers", path, cutoff_, num_layers_);

  const std::string precision = dtype.empty() ? file_dtype : dtype;
  dtype_ = precision == "float64" ? torch::kFloat64 : torch::kFloat32;
  model_.eval();
  // floating-point weights and buffers only, as torch.nn.Module.to(dtype) (Module::to in C++ would also
  // turn the integer species table into floats)
  for (const auto &tensor : model_.parameters()) tensor.set_data(tensor.to(dtype_));
  for (const auto &tensor : model_.buffers())
    if (tensor.is_floating_point()) tensor.set_data(tensor.to(dtype_));
  // forward() then returns per-atom energies only, keeping their autograd graph: compute() differentiates
  // the local atoms' energy itself (the file's own forces would be those of all atoms, ghosts included)
  model_.setattr("compute_forces", false);
  if (comm->me == 0)
    utils::logmesg(lmp, "pair_style mlpot: {} model of {} from {}, cutoff {} A, {} layers, {}\n", kind,
                   species_names(species_), path, cutoff_, num_layers_, precision);
}

// pair_coeff * * H C O: the element of each atom type, in type order
void PairMLPot::coeff(int narg, char **arg)
{
  if (!allocated) allocate();
  const int ntypes = atom->ntypes;
  if (narg != 2 + ntypes || strcmp(arg[0], "*") != 0 || strcmp(arg[1], "*") != 0)
    error->all(FLERR, "Incorrect args for pair_coeff mlpot: use pair_coeff * * followed by the element of each "
               "of the {} atom types (e.g. pair_coeff * * H C O)", ntypes);
  type_z_.assign(ntypes + 1, 0);
  for (int t = 1; t <= ntypes; t++) {
    const std::string symbol = arg[1 + t];
    const int z = atomic_number(symbol);
    if (z == 0) error->all(FLERR, "pair_coeff mlpot: {} (atom type {}) is not an element symbol", symbol, t);
    bool known = false;
    for (int s : species_) known = known || s == z;
    if (!known)
      error->all(FLERR, "pair_coeff mlpot: element {} (atom type {}) is not one this model knows ({})", symbol, t,
                 species_names(species_));
    type_z_[t] = z;
  }
  for (int i = 1; i <= ntypes; i++)
    for (int j = i; j <= ntypes; j++) setflag[i][j] = 1;
}

void PairMLPot::init_style()
{
  if (strcmp(update->unit_style, "metal") != 0)
    error->all(FLERR, "pair_style mlpot needs units metal (eV, Angstrom)");
  if (force->newton_pair == 0)
    error->all(FLERR, "pair_style mlpot needs newton pair on (forces on ghost atoms go back to their owners)");
  neighbor->add_request(this, NeighConst::REQ_FULL | NeighConst::REQ_GHOST);
  // a local atom's energy depends on atoms up to num_layers x cutoff away (GCN: one more): ghosts must reach that far
  const double needed = reach_ * cutoff_ + neighbor->skin;
  if (comm->cutghostuser < needed) {
    comm->cutghostuser = needed;
    if (comm->me == 0)
      utils::logmesg(lmp, "pair_style mlpot: ghost cutoff set to {} x {} + skin = {} A\n", reach_, cutoff_, needed);
  }
}

double PairMLPot::init_one(int i, int j)
{
  if (setflag[i][j] == 0) error->all(FLERR, "All pair coeffs are not set");
  cutghost[i][j] = cutghost[j][i] = cutoff_;
  return cutoff_;
}

void PairMLPot::compute(int eflag, int vflag)
{
  ev_init(eflag, vflag);
  const int nlocal = atom->nlocal;
  const int nall = nlocal + atom->nghost;
  if (nlocal == 0) return;
  double **x = atom->x;
  double **f = atom->f;
  const int *type = atom->type;

  // edges i -> j within the cutoff, for local and ghost centres (edge vector x[j] - x[i])
  std::vector<int64_t> centre, neighbour;
  const double cutsq_model = cutoff_ * cutoff_;
  const int num_centres = list->inum + list->gnum;
  for (int ii = 0; ii < num_centres; ii++) {
    const int i = list->ilist[ii];
    const int *jlist = list->firstneigh[i];
    for (int jj = 0; jj < list->numneigh[i]; jj++) {
      const int j = jlist[jj] & NEIGHMASK;
      const double dx = x[j][0] - x[i][0], dy = x[j][1] - x[i][1], dz = x[j][2] - x[i][2];
      if (dx * dx + dy * dy + dz * dz < cutsq_model) {
        centre.push_back(i);
        neighbour.push_back(j);
      }
    }
  }
  const int64_t num_edges = centre.size();

  const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  const auto i64 = torch::TensorOptions().dtype(torch::kInt64);
  torch::Tensor pos = torch::from_blob(x[0], {nall, 3}, f64).clone();
  if (dtype_ == torch::kFloat32) {
    // float32 differences positions: move them near zero first (the edge vectors do not change)
    double origin[3];
    for (int k = 0; k < 3; k++) origin[k] = std::round(0.5 * (domain->sublo[k] + domain->subhi[k]));
    pos -= torch::from_blob(origin, {1, 3}, f64);
  }
  pos = pos.to(dtype_).requires_grad_(true);
  std::vector<int64_t> numbers(nall);
  for (int a = 0; a < nall; a++) numbers[a] = type_z_[type[a]];
  const bool want_virial = vflag_either && num_edges > 0;
  torch::Tensor shift = torch::zeros({num_edges, 3}, torch::TensorOptions().dtype(dtype_));
  if (want_virial) shift.requires_grad_(true);

  c10::Dict<std::string, torch::Tensor> graph;
  graph.insert("pos", pos);
  graph.insert("atomic_numbers", torch::from_blob(numbers.data(), {nall}, i64).clone());
  graph.insert("edge_index", torch::stack({torch::from_blob(centre.data(), {num_edges}, i64),
                                           torch::from_blob(neighbour.data(), {num_edges}, i64)})
                                 .clone());
  graph.insert("shift", shift);
  graph.insert("batch", torch::zeros({nall}, i64));
  graph.insert("num_atoms", torch::full({1}, (int64_t) nall, i64));

  torch::Tensor node_energy;
  try {
    node_energy = model_.forward({graph}).toGenericDict().at("node_energy").toTensor();
  } catch (const std::exception &err) {
    // TorchScript's message: the interpreter's frames, then the error itself on the last lines
    std::string what = err.what();
    const auto last = what.find_last_not_of("\n ");
    const auto start = what.rfind('\n', what.rfind('\n', last) - 1);
    error->one(FLERR, "pair_style mlpot: the model failed: {}", what.substr(start == std::string::npos ? 0 : start + 1));
  }
  const torch::Tensor local_energy = node_energy.narrow(0, 0, nlocal).sum();
  std::vector<torch::Tensor> inputs{pos};
  if (want_virial) inputs.push_back(shift);
  const auto grads = torch::autograd::grad({local_energy}, inputs, {}, false, false, true);

  if (grads[0].defined()) {
    const torch::Tensor forces = (-grads[0]).to(torch::kFloat64).contiguous();
    const auto fa = forces.accessor<double, 2>();
    for (int a = 0; a < nall; a++)
      for (int k = 0; k < 3; k++) f[a][k] += fa[a][k];
  }

  if (eflag_either) {
    const torch::Tensor energies = node_energy.detach().narrow(0, 0, nlocal).to(torch::kFloat64).contiguous();
    const double *e = energies.data_ptr<double>();
    for (int i = 0; i < nlocal; i++) {
      if (eflag_global) eng_vdwl += e[i];
      if (eflag_atom) eatom[i] += e[i];
    }
  }

  if (want_virial && grads[1].defined()) {
    // W = -sum_edges r_ij (x) dE/dr_ij; per atom, half of each edge's share to each of its two atoms
    const torch::Tensor dedr = grads[1].to(torch::kFloat64).contiguous();
    const auto g = dedr.accessor<double, 2>();
    for (int64_t e = 0; e < num_edges; e++) {
      const int i = centre[e], j = neighbour[e];
      const double r[3] = {x[j][0] - x[i][0], x[j][1] - x[i][1], x[j][2] - x[i][2]};
      const double v[6] = {-r[0] * g[e][0], -r[1] * g[e][1], -r[2] * g[e][2],
                           -r[0] * g[e][1], -r[0] * g[e][2], -r[1] * g[e][2]};
      for (int k = 0; k < 6; k++) {
        if (vflag_global) virial[k] += v[k];
        if (vflag_atom) {
          vatom[i][k] += 0.5 * v[k];
          vatom[j][k] += 0.5 * v[k];
        }
      }
    }
  }
}
