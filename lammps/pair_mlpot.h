// pair_style mlpot: a deployed mlpot TorchScript model as a LAMMPS pair style (plugin).
// SPDX-License-Identifier: GPL-2.0-or-later  (see LICENSE.md in this folder)

#ifndef MLPOT_PAIR_MLPOT_H
#define MLPOT_PAIR_MLPOT_H

#include "pair.h"

#include <torch/csrc/autograd/autograd.h>
#include <torch/script.h>

#include <string>
#include <vector>

namespace LAMMPS_NS {

class PairMLPot : public Pair {
 public:
  explicit PairMLPot(class LAMMPS *);
  ~PairMLPot() override;

  void settings(int, char **) override;
  void coeff(int, char **) override;
  void init_style() override;
  double init_one(int, int) override;
  void compute(int, int) override;

 private:
  torch::jit::Module model_;
  torch::Dtype dtype_ = torch::kFloat32;
  double cutoff_ = 0.0;        // model cutoff, Å
  int num_layers_ = 0;         // message-passing layers
  int reach_ = 0;              // ghosts must reach reach_ * cutoff: num_layers (GCN: num_layers + 1)
  std::vector<int> species_;   // atomic numbers the model knows
  std::vector<long> type_z_;   // atomic number of each LAMMPS atom type (index 1..ntypes)

  void allocate();
  void load_model(const std::string &path, const std::string &dtype);
};

}    // namespace LAMMPS_NS

#endif
