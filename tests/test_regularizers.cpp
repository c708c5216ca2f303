// Loss-term plugins of the pruning stage against hand computations on small hand-made tensors:
// RbfParamDistance in each mode (raw, readable, map; docs/method.md §3.3, §6.1) and CrossEntropyTerm (§6.3),
// built through the registry from JSON like every other component. (FlopsBudget is tested with the pruning
// stage.) Every expected value below is worked out in the comments; all tensors are double.
#include "test_support.h"

#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "isp/registry/error.h"
#include "isp/interfaces/regularizer.h"

using isp::json;

namespace {

struct RegularizerFixture {
  isp::Registry reg;
  std::unique_ptr<isp::BuildContext> c_;
  RegularizerFixture() {
    for (const char* lib : {"isp_regularizers_rbf_distance", "isp_regularizers_cross_entropy"})
      reg.load_library(isp_test::plugin(lib));
  }
  std::shared_ptr<isp::Regularizer> one(const json& spec) {
    c_ = std::make_unique<isp::BuildContext>(reg, json{{"nodes", {{"x", spec}}}},
                                             [](const std::string& p) { return isp::Where{"t.json", p}; });
    return c_->node<isp::Regularizer>("x");
  }
};

at::Tensor d(std::initializer_list<double> v) { return torch::tensor(std::vector<double>(v), torch::kDouble); }

// A [2,3] tensor with rows a and b.
at::Tensor rows(std::initializer_list<double> a, std::initializer_list<double> b) { return torch::stack({d(a), d(b)}); }

double value(const at::Tensor& t) {
  REQUIRE(t.dim() == 0);
  return t.item<double>();
}

}  // namespace

TEST_CASE_FIXTURE(RegularizerFixture, "regularizers: RbfParamDistance raw mode is the MSE of the head outputs") {
  auto r = one({{"type", "RbfParamDistance"}});
  CHECK(r->term() == "interp");
  CHECK(r->weight() == 10.0);  // official mse_w
  isp::LossInputs in;
  // Differences (-0.5, 1, 0 | -2, 0, 0.5): squares 0.25 + 1 + 0 + 4 + 0 + 0.25 = 5.5 over 6 entries.
  in.params = rows({1.0, 2.0, 3.0}, {4.0, 5.0, 6.0}).requires_grad_(true);
  in.params_ref = rows({1.5, 1.0, 3.0}, {6.0, 5.0, 5.5});
  // The other modes' inputs are present and wildly different: raw mode must not read them.
  in.readable = rows({100, 100, 100}, {100, 100, 100});
  in.readable_ref = rows({0, 0, 0}, {0, 0, 0});
  in.probs = torch::ones({2, 1, 2, 2}, torch::kDouble);
  in.maps_ref = torch::zeros({2, 1, 2, 2}, torch::kDouble);
  at::Tensor t = r->compute(in);
  CHECK(value(t) == doctest::Approx(5.5 / 6.0).epsilon(1e-14));
  // d/dparams mean((p - r)^2) = 2 (p - r) / 6.
  t.backward();
  CHECK(torch::allclose(in.params.grad(), 2.0 * (in.params - in.params_ref).detach() / 6.0, 1e-14, 0));
  // Identical parameters: exactly zero.
  in.params_ref = in.params.detach().clone();
  CHECK(value(r->compute(in)) == 0.0);

  // Missing inputs name the term and what it needs.
  isp::LossInputs no_ref;
  no_ref.params = rows({1, 2, 3}, {4, 5, 6});
  no_ref.readable = no_ref.params;
  no_ref.readable_ref = no_ref.params;
  CHECK_THROWS_WITH_AS(r->compute(no_ref), "regularizer 'interp' needs reference selector parameters, which this stage does not provide",
                       isp::Error);
  isp::LossInputs no_params;
  no_params.params_ref = rows({1, 2, 3}, {4, 5, 6});
  CHECK_THROWS_WITH_AS(r->compute(no_params), doctest::Contains("needs selector parameters"), isp::Error);
}

TEST_CASE_FIXTURE(RegularizerFixture, "regularizers: RbfParamDistance readable mode is the MSE of (c_row, c_col, sigma)") {
  auto r = one({{"type", "RbfParamDistance"}, {"mode", "readable"}, {"weight", 2.5}});
  CHECK(r->term() == "interp");
  CHECK(r->weight() == 2.5);
  isp::LossInputs in;
  // Differences (-1, 2, 0 | 0, -3, 2): squares 1 + 4 + 0 + 0 + 9 + 4 = 18 over 6 entries = 3.
  in.readable = rows({16.0, 16.0, 5.0}, {10.0, 20.0, 8.0});
  in.readable_ref = rows({17.0, 14.0, 5.0}, {10.0, 23.0, 6.0});
  in.params = rows({100, 100, 100}, {100, 100, 100});  // not read in this mode
  in.params_ref = rows({0, 0, 0}, {0, 0, 0});
  CHECK(value(r->compute(in)) == doctest::Approx(3.0).epsilon(1e-14));
  // The distance is symmetric.
  std::swap(in.readable, in.readable_ref);
  CHECK(value(r->compute(in)) == doctest::Approx(3.0).epsilon(1e-14));

  // What raw mode needs is not enough here. (With both inputs missing, which one the message names depends on
  // the compiler's argument evaluation order, so only the common part is checked.)
  isp::LossInputs only_params;
  only_params.params = rows({1, 2, 3}, {4, 5, 6});
  only_params.params_ref = only_params.params;
  CHECK_THROWS_WITH_AS(r->compute(only_params), doctest::Contains("regularizer 'interp' needs"), isp::Error);
  CHECK_THROWS_WITH_AS(r->compute(only_params), doctest::Contains("RBF centres and sigma"), isp::Error);
  isp::LossInputs no_own;
  no_own.readable_ref = rows({1, 2, 3}, {4, 5, 6});
  CHECK_THROWS_WITH_AS(r->compute(no_own), "regularizer 'interp' needs RBF centres and sigma, which this stage does not provide",
                       isp::Error);
  isp::LossInputs no_ref;
  no_ref.readable = rows({1, 2, 3}, {4, 5, 6});
  CHECK_THROWS_WITH_AS(r->compute(no_ref), doctest::Contains("needs reference RBF centres and sigma"), isp::Error);
}

TEST_CASE_FIXTURE(RegularizerFixture, "regularizers: RbfParamDistance map mode is the mean squared difference of the maps") {
  auto r = one({{"type", "RbfParamDistance"}, {"mode", "map"}});
  isp::LossInputs in;
  // Image 0: [[1, 0], [0.5, 0.5]] vs [[0.5, 0], [0.5, 1]]: squares 0.25 + 0 + 0 + 0.25 = 0.5.
  // Image 1: all 0.25 vs all 0.75: 4 * 0.25 = 1. Total 1.5 over 8 pixels = 0.1875.
  in.probs = torch::stack({d({1.0, 0.0, 0.5, 0.5}), d({0.25, 0.25, 0.25, 0.25})}).view({2, 1, 2, 2});
  in.maps_ref = torch::stack({d({0.5, 0.0, 0.5, 1.0}), d({0.75, 0.75, 0.75, 0.75})}).view({2, 1, 2, 2});
  in.params = rows({100, 100, 100}, {100, 100, 100});  // not read in this mode
  in.params_ref = rows({0, 0, 0}, {0, 0, 0});
  CHECK(value(r->compute(in)) == doctest::Approx(0.1875).epsilon(1e-14));

  // The gated model's map is `probs` (what PruneChannels fills); the reference map is `maps_ref`.
  isp::LossInputs no_ref;
  no_ref.probs = in.probs;
  no_ref.maps = in.probs;
  CHECK_THROWS_WITH_AS(r->compute(no_ref), "regularizer 'interp' needs reference mask maps, which this stage does not provide",
                       isp::Error);
  isp::LossInputs no_probs;
  no_probs.maps_ref = in.maps_ref;
  CHECK_THROWS_WITH_AS(r->compute(no_probs), doctest::Contains("needs mask maps"), isp::Error);

  // Unknown modes and negative weights are recipe errors naming the field.
  CHECK_THROWS_WITH_AS(one({{"type", "RbfParamDistance"}, {"mode", "pixels"}}), doctest::Contains("/nodes/x/mode"),
                       isp::RecipeError);
  CHECK_THROWS_WITH_AS(one({{"type", "RbfParamDistance"}, {"weight", -1.0}}), doctest::Contains("/nodes/x/weight"),
                       isp::RecipeError);
}

TEST_CASE_FIXTURE(RegularizerFixture, "regularizers: CrossEntropyTerm is the mean cross-entropy of the logits") {
  auto r = one({{"type", "CrossEntropyTerm"}});
  CHECK(r->term() == "ce");
  CHECK(r->weight() == 1.0);
  CHECK(one({{"type", "CrossEntropyTerm"}, {"weight", 0.5}})->weight() == 0.5);
  isp::LossInputs in;
  // Sample 0: logits (1, 2, 3), label 2: -log(e^3 / (e + e^2 + e^3)) = log(1 + e^-1 + e^-2).
  // Sample 1: logits (0, 0, 0), label 0: log 3. Sample 2: logits (5, -5, 0), label 1: log(e^5 + e^-5 + 1) + 5.
  in.logits = torch::stack({d({1, 2, 3}), d({0, 0, 0}), d({5, -5, 0})}).requires_grad_(true);
  in.labels = torch::tensor({2, 0, 1}, torch::kLong);
  const double ce0 = std::log(1 + std::exp(-1.0) + std::exp(-2.0)), ce1 = std::log(3.0),
               ce2 = std::log(std::exp(5.0) + std::exp(-5.0) + 1.0) + 5.0;
  at::Tensor t = r->compute(in);
  CHECK(value(t) == doctest::Approx((ce0 + ce1 + ce2) / 3).epsilon(1e-13));
  // Gradient: (softmax - onehot) / n.
  t.backward();
  at::Tensor expect = (torch::softmax(in.logits.detach(), 1) - torch::one_hot(in.labels, 3).to(torch::kDouble)) / 3.0;
  CHECK(torch::allclose(in.logits.grad(), expect, 1e-12, 1e-15));

  isp::LossInputs no_labels;
  no_labels.logits = in.logits.detach();
  CHECK_THROWS_WITH_AS(r->compute(no_labels), "regularizer 'ce' needs labels, which this stage does not provide", isp::Error);
  isp::LossInputs no_logits;
  no_logits.labels = in.labels;
  no_logits.probs = torch::ones({3, 1, 2, 2});
  CHECK_THROWS_WITH_AS(r->compute(no_logits), doctest::Contains("'ce' needs classifier logits"), isp::Error);
}
