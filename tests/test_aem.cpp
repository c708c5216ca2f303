// AEM components (docs/method.md §1b, §1c, §2.3, §2.4, §2.5, §3.1, §3.2): samplers, mask sources, feature filters,
// the U-Net decoder, mask heads and the mask regularizers, built through the registry from JSON.
#include "test_support.h"

#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "isp/registry/error.h"
#include "isp/interfaces/aem.h"
#include "isp/interfaces/backbone.h"
#include "isp/interfaces/regularizer.h"

using isp::json;

namespace {

struct AemFixture {
  isp::Registry reg;
  AemFixture() {
    for (const char* lib :
         {"isp_backbones_resnet_cifar", "isp_backbones_mobilenetv2_cifar", "isp_samplers_relaxed_bernoulli",
          "isp_samplers_gumbel_sigmoid", "isp_samplers_bernoulli", "isp_mask_sources_random_rbf",
          "isp_mask_sources_bernoulli_masks", "isp_feature_filters_class_embedding", "isp_feature_filters_identity",
          "isp_decoders_unet", "isp_mask_heads_rbf", "isp_mask_heads_realx_pixel", "isp_regularizers_mask_area",
          "isp_regularizers_mask_smoothness"})
      reg.load_library(isp_test::plugin(lib));
  }
  std::unique_ptr<isp::BuildContext> ctx(const json& nodes) {
    return std::make_unique<isp::BuildContext>(reg, json{{"nodes", nodes}},
                                               [](const std::string& p) { return isp::Where{"t.json", p}; });
  }
  template <class I> std::shared_ptr<I> one(const json& spec) {
    c_ = ctx(json{{"x", spec}});
    return c_->node<I>("x");
  }
  // A selector stack on a backbone spec: enc, filter, dec, head.
  std::unique_ptr<isp::BuildContext> selector(const json& backbone, const json& head = json{{"type", "RbfMaskHead"}},
                                              const json& decoder = json{{"type", "UNetDecoder"}}) {
    json h = head, d = decoder;
    h["decoder"] = {{"$ref", "dec"}};
    if (h["type"] == "RbfMaskHead") h["encoder"] = {{"$ref", "enc"}};
    d["encoder"] = {{"$ref", "enc"}};
    return ctx(json{{"enc", backbone},
                    {"filter", {{"type", "ClassEmbeddingFilter"}, {"encoder", {{"$ref", "enc"}}}}},
                    {"dec", d},
                    {"head", h}});
  }
  // An RbfMaskHead with extra options (on a ResNet-20 selector stack), in double precision, its 1x1 conv that
  // predicts (u_row, u_col, u_sigma) zeroed and its biases set: every pixel then gets the same parameters.
  std::shared_ptr<isp::MaskHead> rbf_head(const json& options, const std::vector<double>& bias) {
    json h = options;
    h["type"] = "RbfMaskHead";
    heads_.push_back(selector({{"type", "ResNetCifar"}, {"depth", 20}}, h));
    auto head = heads_.back()->node<isp::MaskHead>("head");
    head->to(torch::kDouble);
    torch::NoGradGuard ng;
    head->named_parameters()["conv.weight"].zero_();
    head->named_parameters()["conv.bias"].copy_(torch::tensor(bias, torch::kDouble));
    return head;
  }
  std::unique_ptr<isp::BuildContext> c_;
  std::vector<std::unique_ptr<isp::BuildContext>> heads_;
};

double share_true(const at::Tensor& boolean) { return boolean.to(at::kDouble).mean().item<double>(); }

// Direct formula of the official RBF map at pixel (i, j): g / (max g + 1e-8), g = N(.; c, sigma) on the grid.
double rbf_direct(double cr, double cc, double sigma, int64_t S, int64_t i, int64_t j) {
  auto g = [&](int64_t a, int64_t b) {
    const double d = (a - cr) * (a - cr) + (b - cc) * (b - cc);
    return std::exp(-d / (2 * sigma * sigma)) / (2 * M_PI * sigma * sigma);
  };
  double gmax = 0;
  for (int64_t a = 0; a < S; ++a)
    for (int64_t b = 0; b < S; ++b) gmax = std::max(gmax, g(a, b));
  return g(i, j) / (gmax + 1e-8);
}

double softplus(double u) { return std::log1p(std::exp(u)); }

}  // namespace

// ---------------------------------------------------------------------------------------------- samplers

TEST_CASE_FIXTURE(AemFixture, "AEM: RelaxedBernoulli statistics, temperature limit and probs edge cases") {
  torch::manual_seed(1);
  const int64_t N = 200000;
  at::Tensor p = torch::full({N}, 0.3);
  for (double tau : {1.0, 5.0}) {
    auto s = one<isp::MaskSampler>({{"type", "RelaxedBernoulli"}, {"temperature", tau}})->sample(p);
    CHECK(s.min().item<double>() >= 0.0);
    CHECK(s.max().item<double>() <= 1.0);
    // P(s > 0.5) = P(logit + logistic noise > 0) = p for every temperature.
    CHECK(std::abs(share_true(s.gt(0.5)) - 0.3) < 0.01);
  }
  // tau = 1: the relaxed mean is not p (it is pulled toward 1/2).
  auto s1 = one<isp::MaskSampler>({{"type", "RelaxedBernoulli"}, {"temperature", 1.0}})->sample(p);
  MESSAGE("RelaxedBernoulli(tau=1, p=0.3) mean = " << s1.mean().item<double>());
  CHECK(s1.mean().item<double>() > 0.33);
  // tau -> 0: the mean tends to p and almost every value is within 1e-3 of {0,1}.
  auto s0 = one<isp::MaskSampler>({{"type", "RelaxedBernoulli"}, {"temperature", 0.01}})->sample(p);
  CHECK(std::abs(s0.mean().item<double>() - 0.3) < 0.01);
  const double near_binary = share_true(at::minimum(s0, 1 - s0).lt(1e-3));
  MESSAGE("tau=0.01: fraction within 1e-3 of {0,1} = " << near_binary);
  CHECK(near_binary > 0.95);
  // p = 0 and p = 1 are clamped to (eps, 1-eps): no NaN.
  auto s = one<isp::MaskSampler>({{"type", "RelaxedBernoulli"}})->sample(torch::tensor({0.0, 1.0, 0.5}));
  CHECK(!s.isnan().any().item<bool>());
  // Gradients flow through the relaxed sample.
  at::Tensor q = torch::full({1000}, 0.4, torch::requires_grad());
  one<isp::MaskSampler>({{"type", "RelaxedBernoulli"}})->sample(q).sum().backward();
  CHECK(q.grad().gt(0).all().item<bool>());
}

TEST_CASE_FIXTURE(AemFixture, "AEM: hard straight-through samplers give {0,1} forward and non-zero gradients") {
  torch::manual_seed(2);
  for (const char* type : {"RelaxedBernoulli", "GumbelSigmoid"}) {
    CAPTURE(type);
    auto sampler = one<isp::MaskSampler>({{"type", type}, {"hard", true}});
    at::Tensor logits = torch::randn({4096}, torch::requires_grad());
    at::Tensor s = sampler->sample_logits(logits);
    CHECK(s.eq(0).logical_or(s.eq(1)).all().item<bool>());
    (s * torch::linspace(-1, 1, 4096)).sum().backward();
    CHECK(logits.grad().abs().sum().item<double>() > 0);
    CHECK(!logits.grad().isnan().any().item<bool>());
  }
}

TEST_CASE_FIXTURE(AemFixture, "AEM: GumbelSigmoid gate statistics, offset and deterministic decision") {
  torch::manual_seed(3);
  auto gs = one<isp::MaskSampler>({{"type", "GumbelSigmoid"}});  // T = 0.4, offset 3
  const int64_t N = 200000;
  // P(v >= 0.5) = P(g >= -(theta + 3)) = 1 - exp(-exp(theta + 3)).
  for (double theta : {-3.0, -4.0, -2.5}) {
    CAPTURE(theta);
    const double expected = 1 - std::exp(-std::exp(theta + 3));
    const double got = share_true(gs->sample_logits(torch::full({N}, theta)).ge(0.5));
    MESSAGE("theta=" << theta << ": P(on) = " << got << " expected " << expected);
    CHECK(std::abs(got - expected) < 0.01);
  }
  // theta = 0 with offset 3: 1 - exp(-e^3) = 1 - 1.9e-9, i.e. practically always on.
  CHECK(share_true(gs->sample_logits(torch::zeros({N})).ge(0.5)) > 0.9999);
  // sample(p) follows Eq. 14 without the offset: P(on) = P(g >= -log p) = 1 - exp(-p).
  const double got = share_true(gs->sample(torch::full({N}, 0.5)).ge(0.5));
  CHECK(std::abs(got - (1 - std::exp(-0.5))) < 0.01);
  // Deterministic decision uses the offset.
  at::Tensor d = gs->deterministic_logits(torch::tensor({0.0, -2.9, -3.1, -10.0}));
  CHECK(torch::equal(d, torch::tensor({1.0f, 1.0f, 0.0f, 0.0f})));
  // Zero offset: deterministic 1[theta >= 0] and P(on | theta = 0) = 1 - 1/e.
  auto g0 = one<isp::MaskSampler>({{"type", "GumbelSigmoid"}, {"offset", 0.0}, {"temperature", 1.0}});
  CHECK(std::abs(share_true(g0->sample_logits(torch::zeros({N})).ge(0.5)) - (1 - std::exp(-1.0))) < 0.01);
  CHECK_THROWS_AS(one<isp::MaskSampler>({{"type", "GumbelSigmoid"}, {"temperature", 0.0}}), isp::RecipeError);
}

TEST_CASE_FIXTURE(AemFixture, "AEM: Bernoulli sampler and its straight-through gradient") {
  torch::manual_seed(4);
  at::Tensor p = torch::full({100000}, 0.3, torch::requires_grad());
  at::Tensor s = one<isp::MaskSampler>({{"type", "Bernoulli"}})->sample(p);
  CHECK(s.eq(0).logical_or(s.eq(1)).all().item<bool>());
  CHECK(std::abs(s.mean().item<double>() - 0.3) < 0.01);
  CHECK(!s.requires_grad());
  at::Tensor st = one<isp::MaskSampler>({{"type", "Bernoulli"}, {"straight_through", true}})->sample(p);
  CHECK(st.eq(0).logical_or(st.eq(1)).all().item<bool>());
  (st * 2).sum().backward();
  CHECK(torch::allclose(p.grad(), torch::full({100000}, 2.0)));
}

// ------------------------------------------------------------------------------------------ mask sources

TEST_CASE_FIXTURE(AemFixture, "AEM: RandomRbfMasks shapes, values, centres and sampling") {
  torch::manual_seed(5);
  const int64_t n = 4000;
  auto probs_src = one<isp::MaskSource>({{"type", "RandomRbfMasks"}, {"return_probs", true}});
  at::Tensor P = probs_src->sample(n, 32, 32, torch::TensorOptions().dtype(torch::kFloat));
  REQUIRE(P.sizes() == at::IntArrayRef({n, 1, 32, 32}));
  CHECK(P.min().item<double>() > 0.0);
  at::Tensor pmax = std::get<0>(P.view({n, -1}).max(1));
  CHECK(torch::allclose(pmax, torch::ones({n})));
  at::Tensor arg = std::get<1>(P.view({n, -1}).max(1));
  at::Tensor row = arg.div(32, "floor").to(at::kDouble), col = arg.remainder(32).to(at::kDouble);
  // Centres ~ U(2, 30): the nearest grid point lies in [2, 30], mean 16, and the whole range is used.
  CHECK(row.min().item<double>() >= 2);
  CHECK(row.max().item<double>() <= 30);
  CHECK(col.min().item<double>() >= 2);
  CHECK(col.max().item<double>() <= 30);
  CHECK(std::abs(row.mean().item<double>() - 16) < 0.8);
  CHECK(std::abs(col.mean().item<double>() - 16) < 0.8);
  CHECK(row.min().item<double>() <= 3);
  CHECK(row.max().item<double>() >= 29);
  // sigma ~ U(5, 11): at the argmax, the neighbour one row away (toward the centre of the image) has
  // P = exp(-(1 +/- 2 delta)/(2 sigma^2)) with |delta| <= 0.5, so P in [exp(-2/50), exp(0)) for sigma >= 5.
  at::Tensor nb = P.view({n, -1}).gather(1, (arg + at::where(row.lt(16), 32, -32)).view({n, 1}));
  CHECK(nb.min().item<double>() >= std::exp(-2.0 / 50.0) - 1e-6);
  // The mask itself: RelaxedBernoulli(0.1) in [0,1], no gradient, on the requested dtype.
  auto src = one<isp::MaskSource>({{"type", "RandomRbfMasks"}});
  at::Tensor m = src->sample(8, 32, 32, torch::TensorOptions().dtype(torch::kFloat));
  CHECK(m.sizes() == at::IntArrayRef({8, 1, 32, 32}));
  CHECK(m.min().item<double>() >= 0);
  CHECK(m.max().item<double>() <= 1);
  CHECK(!m.requires_grad());
  CHECK((m.scalar_type() == at::kFloat));
  // Non-square sizes work.
  CHECK(src->sample(2, 20, 28, torch::TensorOptions()).sizes() == at::IntArrayRef({2, 1, 20, 28}));
}

TEST_CASE_FIXTURE(AemFixture, "AEM: BernoulliMasks relaxed and hard") {
  torch::manual_seed(6);
  at::Tensor m = one<isp::MaskSource>({{"type", "BernoulliMasks"}})->sample(100, 32, 32, torch::TensorOptions());
  CHECK(m.sizes() == at::IntArrayRef({100, 1, 32, 32}));
  CHECK(m.min().item<double>() >= 0);
  CHECK(m.max().item<double>() <= 1);
  CHECK(std::abs(share_true(m.gt(0.5)) - 0.5) < 0.01);
  CHECK(std::abs(m.mean().item<double>() - 0.5) < 0.01);
  // tau = 0.1: within 1e-2 of {0,1} iff |logistic noise| > 0.1*log(99), probability 1 - 0.2258 = 0.774.
  CHECK(std::abs(share_true(at::minimum(m, 1 - m).lt(1e-2)) - 0.774) < 0.01);
  at::Tensor h = one<isp::MaskSource>({{"type", "BernoulliMasks"}, {"relaxed", false}, {"p", 0.3}})
                     ->sample(100, 32, 32, torch::TensorOptions());
  CHECK(h.eq(0).logical_or(h.eq(1)).all().item<bool>());
  CHECK(std::abs(h.mean().item<double>() - 0.3) < 0.01);
}

// ------------------------------------------------------------------------------------------ RBF head

TEST_CASE_FIXTURE(AemFixture, "AEM: RbfMaskHead map equals the direct formula, batch vectorised") {
  auto c = selector({{"type", "ResNetCifar"}, {"depth", 20}});
  auto head = c->node<isp::MaskHead>("head");
  auto conv_w = head->named_parameters()["conv.weight"];
  auto conv_b = head->named_parameters()["conv.bias"];
  REQUIRE(conv_w.sizes() == at::IntArrayRef({3, 16, 32, 32}));
  CHECK(conv_b[2].item<double>() == doctest::Approx(10.0));  // initial_sigma = 32*10/32
  head->to(torch::kDouble);
  // u_k = bias + t_k * w with w = weight[:,0,0,0] and t_k = features[k,0,0,0] (all other weights zero).
  {
    torch::NoGradGuard ng;
    conv_w = head->named_parameters()["conv.weight"];
    conv_b = head->named_parameters()["conv.bias"];
    conv_w.zero_();
    conv_w.select(1, 0).select(1, 0).select(1, 0).copy_(torch::tensor({4.0, -9.0, -1.5}, torch::kDouble));
    conv_b.copy_(torch::tensor({3.0, -5.0, 2.0}, torch::kDouble));
  }
  at::Tensor f = torch::zeros({3, 16, 32, 32}, torch::kDouble);
  f[1][0][0][0] = 1.0;
  f[2][0][0][0] = 3.0;
  isp::MaskDistribution d = head->forward(f);
  REQUIRE(d.probs.sizes() == at::IntArrayRef({3, 1, 32, 32}));
  REQUIRE(d.params.sizes() == at::IntArrayRef({3, 3}));
  REQUIRE(d.readable.sizes() == at::IntArrayRef({3, 3}));
  for (int64_t k = 0; k < 3; ++k) {
    CAPTURE(k);
    const double t = k == 0 ? 0.0 : (k == 1 ? 1.0 : 3.0);
    const double u0 = 3.0 + 4.0 * t, u1 = -5.0 - 9.0 * t, u2 = 2.0 - 1.5 * t;
    CHECK(d.params[k][0].item<double>() == doctest::Approx(u0));
    CHECK(d.params[k][2].item<double>() == doctest::Approx(u2));
    const double cr = 14 * std::tanh(u0 / 14) + 16, cc = 14 * std::tanh(u1 / 14) + 16, sg = softplus(u2) + 1e-8;
    CHECK(d.readable[k][0].item<double>() == doctest::Approx(cr).epsilon(1e-12));
    CHECK(d.readable[k][1].item<double>() == doctest::Approx(cc).epsilon(1e-12));
    CHECK(d.readable[k][2].item<double>() == doctest::Approx(sg).epsilon(1e-12));
    const int64_t ci = std::lround(cr), cj = std::lround(cc);
    for (auto [i, j] : std::vector<std::pair<int64_t, int64_t>>{{ci, cj}, {0, 0}, {31, 5}, {ci, cj + 2}, {17, 30}}) {
      CAPTURE(i);
      CAPTURE(j);
      CHECK(d.probs[k][0][i][j].item<double>() == doctest::Approx(rbf_direct(cr, cc, sg, 32, i, j)).epsilon(1e-9));
    }
    CHECK(std::abs(d.probs[k].max().item<double>() - 1.0) < 1e-5);
    CHECK(d.probs[k][0][ci][cj].item<double>() == d.probs[k].max().item<double>());
  }
  // Quirk off: the same forward values up to the 1e-8 of the denominator, max exactly 1.
  auto c2 = selector({{"type", "ResNetCifar"}, {"depth", 20}}, {{"type", "RbfMaskHead"}, {"sigma_gradient_quirk", false}});
  auto head2 = c2->node<isp::MaskHead>("head");
  head2->to(torch::kDouble);
  {
    torch::NoGradGuard ng;
    for (auto& kv : head->named_parameters()) head2->named_parameters()[kv.key()].copy_(kv.value());
  }
  isp::MaskDistribution d2 = head2->forward(f);
  CHECK(torch::allclose(d2.probs, d.probs, 0, 1e-5));
  CHECK(std::get<0>(d2.probs.view({3, -1}).max(1)).eq(1.0).all().item<bool>());
  // A wrongly sized map is an isp::Error.
  CHECK_THROWS_AS(head->forward(torch::zeros({1, 16, 16, 16}, torch::kDouble)), isp::Error);
}

TEST_CASE_FIXTURE(AemFixture, "AEM: RbfMaskHead sigma gradient, official quirk and exact normalisation") {
  torch::manual_seed(7);
  for (bool quirk : {true, false}) {
    CAPTURE(quirk);
    auto head = rbf_head({{"sigma_gradient_quirk", quirk}}, {2.5, -4.0, 1.7});
    at::Tensor b = head->named_parameters()["conv.bias"];
    at::Tensor f = torch::zeros({1, 16, 32, 32}, torch::kDouble);
    at::Tensor W = torch::rand({1, 1, 32, 32}, torch::kDouble);
    auto loss = [&]() { return (head->forward(f).probs * W).sum(); };
    if (b.grad().defined()) b.grad().zero_();
    loss().backward();
    const at::Tensor grad = b.grad().clone();
    // Exact derivative of the forward map by central finite differences.
    auto fd = [&](int64_t idx) {
      torch::NoGradGuard ng;
      const double h = 1e-5;
      b[idx] += h;
      const double lp = loss().item<double>();
      b[idx] -= 2 * h;
      const double lm = loss().item<double>();
      b[idx] += h;
      return (lp - lm) / (2 * h);
    };
    const double u2 = 1.7, sg = softplus(u2) + 1e-8, dsig = 1 / (1 + std::exp(-u2));
    isp::MaskDistribution d;
    {
      torch::NoGradGuard ng;
      d = head->forward(f);
    }
    const double cr = d.readable[0][0].item<double>(), cc = d.readable[0][1].item<double>();
    at::Tensor ii = torch::arange(32, torch::kDouble).view({32, 1}), jj = torch::arange(32, torch::kDouble).view({1, 32});
    at::Tensor D = (ii - cr).pow(2) + (jj - cc).pow(2);
    at::Tensor P = d.probs[0][0], Wp = W[0][0];
    const double fd2 = fd(2);
    if (quirk) {
      // dP/dsigma = P (D/sigma^3 - 2/sigma): the prefactor's derivative survives the detached max.
      const double formula = (Wp * P * (D / std::pow(sg, 3) - 2 / sg)).sum().item<double>() * dsig;
      MESSAGE("quirk: autograd " << grad[2].item<double>() << " formula " << formula << " finite diff " << fd2);
      CHECK(grad[2].item<double>() == doctest::Approx(formula).epsilon(1e-9));
      CHECK(std::abs(grad[2].item<double>() - fd2) > 1e-3 * std::abs(fd2));  // differs from the true derivative
    } else {
      const double dmin = D.min().item<double>();
      const double formula = (Wp * P * (D - dmin) / std::pow(sg, 3)).sum().item<double>() * dsig;
      MESSAGE("exact: autograd " << grad[2].item<double>() << " formula " << formula << " finite diff " << fd2);
      CHECK(grad[2].item<double>() == doctest::Approx(fd2).epsilon(1e-6));
      CHECK(grad[2].item<double>() == doctest::Approx(formula).epsilon(1e-9));
      CHECK(grad[0].item<double>() == doctest::Approx(fd(0)).epsilon(1e-6));
      CHECK(grad[1].item<double>() == doctest::Approx(fd(1)).epsilon(1e-6));
    }
  }
}

TEST_CASE_FIXTURE(AemFixture, "AEM: under the official quirk the area term pulls sigma up, the exact gradient pulls it down") {
  // Why the quick recipe turns the quirk off (docs/method.md §9): minimising the mean of P must shrink sigma,
  // but the quirk's dP/dsigma = P (D/sigma^3 - 2/sigma) nearly integrates to zero, and on a 32 x 32 grid with a
  // wide map the cut-off tail makes it negative -- gradient descent on the area then *widens* the mask.
  for (bool quirk : {true, false}) {
    CAPTURE(quirk);
    auto head = rbf_head({{"sigma_gradient_quirk", quirk}}, {0.0, 0.0, 10.0});  // centred, sigma 10 (the paper's start)
    at::Tensor b = head->named_parameters()["conv.bias"];
    head->forward(torch::zeros({1, 16, 32, 32}, torch::kDouble)).probs.mean().backward();
    const double d_area_d_u = b.grad()[2].item<double>();
    if (quirk) CHECK(d_area_d_u < 0.0);  // descent raises u_sigma: wider masks
    else CHECK(d_area_d_u > 0.0);        // descent lowers u_sigma: smaller masks
  }
}

TEST_CASE_FIXTURE(AemFixture, "AEM: RbfMaskHead min_sigma floors the width, and the soft_argmax centre is the weighted cell position") {
  // softplus(-30) ~ 0: sigma = the floor
  auto head = rbf_head({{"min_sigma", 4.0}, {"centre", "soft_argmax"}, {"sigma_gradient_quirk", false}}, {0.0, 0.0, -30.0});
  auto params = head->named_parameters();
  REQUIRE(params.contains("heat.weight"));
  {
    torch::NoGradGuard ng;
    params["heat.weight"].zero_();
    params["heat.weight"][0][0][0][0] = 60.0;  // the cell score is 60 x feature channel 0
  }
  at::Tensor f = torch::zeros({2, 16, 32, 32}, torch::kDouble);
  f[0][0][5][20] = 1.0;   // image 0: one hot cell at row 5, column 20
  f[1][0][25][3] = 1.0;   // image 1: two equally hot cells -> the centre lies midway
  f[1][0][25][9] = 1.0;
  isp::MaskDistribution d = head->forward(f);
  CHECK(d.readable[0][0].item<double>() == doctest::Approx(5.0).epsilon(1e-6));
  CHECK(d.readable[0][1].item<double>() == doctest::Approx(20.0).epsilon(1e-6));
  CHECK(d.readable[1][0].item<double>() == doctest::Approx(25.0).epsilon(1e-6));
  CHECK(d.readable[1][1].item<double>() == doctest::Approx(6.0).epsilon(1e-6));
  CHECK(d.readable[0][2].item<double>() == doctest::Approx(4.0).epsilon(1e-6));
  CHECK(d.params[0][0].item<double>() == doctest::Approx(5.0 - 16.0).epsilon(1e-6));  // centre relative to the middle
  CHECK(d.probs[0][0][5][20].item<double>() == doctest::Approx(1.0));
  // The centre carries a gradient back to the cell scores.
  params["heat.weight"].mutable_grad() = at::Tensor();
  d.readable.select(1, 1).sum().backward();
  CHECK(params["heat.weight"].grad().defined());
}

// ------------------------------------------------------------------------------------- selector stacks

TEST_CASE_FIXTURE(AemFixture, "AEM: decoder + heads on ResNet-20 and MobileNetV2 scales") {
  torch::manual_seed(8);
  struct Case {
    json backbone;
    int64_t out_channels, trainable;
  };
  // Trainable selector parameters (filter + decoder + head) of the official code: 179 747 (ResNet-56, same
  // scales as ResNet-20) and 4 944 131 (MobileNetV2), docs/method.md §2.3.
  for (const Case& cs : {Case{{{"type", "ResNetCifar"}, {"depth", 20}}, 16, 179747},
                         Case{{{"type", "MobileNetV2Cifar"}}, 32, 4944131}}) {
    CAPTURE(cs.backbone.dump());
    auto c = selector(cs.backbone);
    auto enc = c->node<isp::Backbone>("enc");
    auto filter = c->node<isp::FeatureFilter>("filter");
    auto dec = c->node<isp::Decoder>("dec");
    auto head = c->node<isp::MaskHead>("head");
    CHECK(dec->out_channels() == cs.out_channels);
    int64_t count = 0;
    for (auto* m : {static_cast<torch::nn::Module*>(filter.get()), static_cast<torch::nn::Module*>(dec.get()),
                    static_cast<torch::nn::Module*>(head.get())})
      for (const auto& p : m->parameters()) count += p.numel();
    CHECK(count == cs.trainable);
    enc->eval();
    at::Tensor x = torch::randn({2, 3, 32, 32});
    at::Tensor y = torch::tensor({3, 7}, torch::kLong);
    std::vector<at::Tensor> scales;
    {
      torch::NoGradGuard ng;
      scales = enc->forward_features(x).scales;
    }
    scales.back() = filter->forward(scales.back(), y);
    at::Tensor feat = dec->forward(scales);
    CHECK(feat.sizes() == at::IntArrayRef({2, cs.out_channels, 32, 32}));
    isp::MaskDistribution d = head->forward(feat);
    CHECK(d.probs.sizes() == at::IntArrayRef({2, 1, 32, 32}));
    CHECK(d.params.sizes() == at::IntArrayRef({2, 3}));
    CHECK(d.readable.sizes() == at::IntArrayRef({2, 3}));
    CHECK(d.probs.min().item<double>() >= 0);
    CHECK(d.probs.max().item<double>() <= 1 + 1e-6);
    d.probs.sum().backward();
    CHECK(filter->named_parameters()["embedding.weight"].grad().abs().sum().item<double>() > 0);
    // Wrong number of scales, wrong skip sizes.
    CHECK_THROWS_AS(dec->forward({scales[1], scales[2]}), isp::Error);
    std::vector<at::Tensor> bad = scales;
    bad[0] = torch::zeros({2, scales[0].size(1), 30, 30});
    CHECK_THROWS_AS(dec->forward(bad), isp::Error);

    // REAL-X pixel head and a deeper / custom-width decoder.
    auto c2 = selector(cs.backbone, {{"type", "RealXPixelHead"}},
                       {{"type", "UNetDecoder"}, {"residual_blocks", 3}, {"channels", {24, 8}}});
    auto dec2 = c2->node<isp::Decoder>("dec");
    CHECK(dec2->out_channels() == 8);
    auto d2 = c2->node<isp::MaskHead>("head")->forward(dec2->forward(scales));
    CHECK(d2.probs.sizes() == at::IntArrayRef({2, 1, 32, 32}));
    CHECK(d2.probs.min().item<double>() >= 0);
    CHECK(d2.probs.max().item<double>() <= 1);
    CHECK(!d2.params.defined());
    CHECK(!d2.readable.defined());
    CHECK_THROWS_AS(selector(cs.backbone, {{"type", "RbfMaskHead"}}, {{"type", "UNetDecoder"}, {"channels", {8}}})
                        ->node<isp::Decoder>("dec"),
                    isp::RecipeError);
  }
}

TEST_CASE_FIXTURE(AemFixture, "AEM: class-embedding feature filter attenuates per location") {
  torch::manual_seed(9);
  auto c = selector({{"type", "ResNetCifar"}, {"depth", 20}});
  auto filter = c->node<isp::FeatureFilter>("filter");
  at::Tensor E = filter->named_parameters()["embedding.weight"];
  REQUIRE(E.sizes() == at::IntArrayRef({10, 64}));
  CHECK(std::abs(E.mean().item<double>()) < 0.15);  // N(0,1) init
  CHECK(std::abs(E.std().item<double>() - 1) < 0.15);
  at::Tensor X = torch::rand({2, 64, 8, 8}) + 0.1;
  at::Tensor y = torch::tensor({4, 6}, torch::kLong);
  torch::NoGradGuard ng;
  // The exact formula with the random embedding.
  at::Tensor a = (X * E.index_select(0, y).view({2, 64, 1, 1})).sum(1, true);
  CHECK(torch::allclose(filter->forward(X, y), X * torch::sigmoid(a), 1e-5, 1e-6));
  // Anti-aligned embedding drives the output to 0, a large aligned one passes X through.
  E[4].fill_(-10.0);
  E[6].fill_(10.0);
  at::Tensor Z = filter->forward(X, y);
  CHECK(Z[0].abs().max().item<double>() < 1e-6);
  CHECK(torch::allclose(Z[1], X[1], 1e-6, 1e-7));
  CHECK_THROWS_AS(filter->forward(torch::zeros({2, 32, 8, 8}), y), isp::Error);
  auto id = one<isp::FeatureFilter>({{"type", "IdentityFilter"}});
  CHECK(torch::equal(id->forward(X, y), X));
}

// ------------------------------------------------------------------------------------------ regularizers

TEST_CASE_FIXTURE(AemFixture, "AEM: MaskArea and MaskSmoothness on hand-made masks") {
  auto area = one<isp::Regularizer>({{"type", "MaskArea"}});
  CHECK(area->term() == "area");
  CHECK(area->weight() == doctest::Approx(0.2));
  isp::LossInputs in;
  in.mask = torch::ones({2, 1, 4, 4}, torch::kDouble);
  CHECK(area->compute(in).item<double>() == doctest::Approx(std::pow(1.0005, 0.3)).epsilon(1e-12));
  // Image 0 all ones, image 1 half zeros: mean of the per-image means.
  in.mask[1].narrow(2, 0, 2).zero_();
  const double half = 0.5 * std::pow(1.0005, 0.3) + 0.5 * std::pow(0.0005, 0.3);
  CHECK(area->compute(in).item<double>() == doctest::Approx(0.5 * std::pow(1.0005, 0.3) + 0.5 * half).epsilon(1e-12));
  isp::LossInputs none;
  CHECK_THROWS_WITH_AS(area->compute(none), doctest::Contains("area"), isp::Error);
  auto area_p = one<isp::Regularizer>({{"type", "MaskArea"}, {"on", "probs"}, {"power", 1.0}, {"eps", 0.0}});
  CHECK_THROWS_AS(area_p->compute(in), isp::Error);  // no probs given
  in.probs = torch::full({2, 1, 4, 4}, 0.25, torch::kDouble);
  CHECK(area_p->compute(in).item<double>() == doctest::Approx(0.25));
  CHECK_THROWS_AS(one<isp::Regularizer>({{"type", "MaskArea"}, {"on", "pixels"}}), isp::RecipeError);

  auto smooth = one<isp::Regularizer>({{"type", "MaskSmoothness"}});
  CHECK(smooth->term() == "smoothness");
  CHECK(smooth->weight() == doctest::Approx(0.001));
  isp::LossInputs s;
  // All ones 4x4: no differences; border = 4 rows/cols of 4 ones = 16 -> 0.3*16/2 = 2.4.
  s.mask = torch::ones({1, 1, 4, 4}, torch::kDouble);
  CHECK(smooth->compute(s).item<double>() == doctest::Approx(2.4));
  // Vertical edge (left two columns 1): 4 horizontal jumps; border: row0 2 + row3 2 + col0 4 + col3 0 = 8;
  // (4 + 0.3*8) / 2 = 3.2. Two identical images: divided by 2n -> same value.
  s.mask = torch::zeros({2, 1, 4, 4}, torch::kDouble);
  s.mask.narrow(3, 0, 2).fill_(1.0);
  CHECK(smooth->compute(s).item<double>() == doctest::Approx(3.2));
  // Single pixel 0.5 at (1,2) in a 4x4 zero mask: 4 neighbour differences of 0.25, not on the border.
  s.mask = torch::zeros({1, 1, 4, 4}, torch::kDouble);
  s.mask[0][0][1][2] = 0.5;
  CHECK(smooth->compute(s).item<double>() == doctest::Approx(0.5));
  // Border coefficient option.
  auto smooth0 = one<isp::Regularizer>({{"type", "MaskSmoothness"}, {"border", 0.0}});
  s.mask = torch::ones({1, 1, 4, 4}, torch::kDouble);
  CHECK(smooth0->compute(s).item<double>() == doctest::Approx(0.0));
  CHECK_THROWS_WITH_AS(smooth->compute(none), doctest::Contains("smoothness"), isp::Error);
}
