// isp_dist_toy WORK_DIR OUT_FILE [bn]: trains a toy network (BatchNorm-free, or with "bn" a conv + BatchNorm pair
// run through isp::ConvBatchNorm, synchronised when ISP_TOY_SYNC_BN=1) for 2 epochs (12 steps of global batch 16,
// with crop and flip augmentation) through isp's own training path -- BatchLoader, FlatSgd with momentum and
// weight decay, run_train_loop -- in one process, or data-parallel when RANK/WORLD_SIZE/MASTER_* are set. Rank 0
// writes the final parameters to OUT_FILE as float64. test_distributed.cpp compares a 2-process run with a
// 1-process run that saw the same global batches.
#include <torch/torch.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <fstream>

#include "isp/data.h"
#include "isp/distributed.h"
#include "isp/interfaces/backbone.h"
#include "isp/optim.h"
#include "isp/registry/recipe.h"
#include "isp/train.h"

namespace {
struct Toy : torch::nn::Module {
  explicit Toy(bool with_bn) {
    conv = register_module("conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 4, 3).padding(1)));
    if (with_bn) bn = register_module("bn", torch::nn::BatchNorm2d(4));
    fc = register_module("fc", torch::nn::Linear(4 * 8 * 8, 3));
  }
  at::Tensor forward(const at::Tensor& x) {
    const at::Tensor h = bn ? conv_bn(*conv, *bn, x) : conv->forward(x);
    return fc->forward(torch::relu(h).flatten(1));
  }
  torch::nn::Conv2d conv{nullptr};
  torch::nn::BatchNorm2d bn{nullptr};
  torch::nn::Linear fc{nullptr};
  isp::ConvBatchNorm conv_bn;
};
}  // namespace

int main(int argc, char** argv) {
  if (argc < 3 || argc > 4) {
    std::fprintf(stderr, "usage: isp_dist_toy WORK_DIR OUT_FILE [bn]\n");
    return 2;
  }
  const bool with_bn = argc == 4 && std::string(argv[3]) == "bn";
  try {
    at::set_num_threads(1);
    isp::dist::Settings settings;
    settings.timeout_s = 60;
    const char* sync = std::getenv("ISP_TOY_SYNC_BN");
    settings.sync_batchnorm = sync && std::string(sync) == "1";
    isp::dist::init(isp::dist::world_from_env(), settings, c10::Device(c10::kCPU));
    torch::manual_seed(7);
    auto model = std::make_shared<Toy>(with_bn);
    isp::ImageSplit split;
    split.images = torch::randn({96, 1, 8, 8});
    split.labels = torch::randint(0, 3, {96}, torch::kLong);
    isp::Augmentation aug;
    aug.crop_padding = 1;
    aug.horizontal_flip = true;
    isp::FlatSgd sgd(model->parameters(), isp::FlatSgdOptions{0.1, 0.9, 1e-4, false});
    isp::BatchLoader loader(split, 16, /*shuffle=*/true, aug, c10::Device(c10::kCPU));
    isp::RunContext ctx;
    ctx.run_dir = argv[1];
    ctx.stage_dir = std::string(argv[1]) + "/toy";
    ctx.stage_name = "toy";
    ctx.seed = 11;
    isp::TrainLoopSpec spec;
    spec.epochs = 2;
    isp::TrainLoopHooks hooks;
    hooks.step = [&](const isp::Batch& b) {
      sgd.zero_grad();
      at::Tensor loss = torch::nn::functional::cross_entropy(model->forward(b.x), b.y);
      loss.backward();
      sgd.step();
      return loss.detach().reshape({1});
    };
    hooks.checkpoint(*model, sgd);
    isp::run_train_loop(spec, hooks, loader, ctx);
    std::vector<at::Tensor> flat;
    for (const auto& p : model->parameters()) flat.push_back(p.detach().to(torch::kDouble).reshape({-1}));
    for (const auto& b : model->buffers()) flat.push_back(b.detach().to(torch::kDouble).reshape({-1}));
    at::Tensor all = torch::cat(flat).contiguous();
    if (isp::writes_files()) {
      std::ofstream out(argv[2], std::ios::binary);
      out.write(static_cast<const char*>(all.data_ptr()), static_cast<std::streamsize>(all.nbytes()));
    }
    const auto* buckets = sgd.gradient_buckets();
    std::fprintf(stderr, "rank %d of %d: %lld parameters, %lld gradient bucket(s), %lld started during backward\n",
                 isp::dist::rank(), isp::dist::world_size(), static_cast<long long>(all.numel()),
                 static_cast<long long>(buckets ? buckets->num_buckets() : 0),
                 static_cast<long long>(buckets ? buckets->overlapped_last_step() : 0));
    isp::dist::shutdown();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
