#pragma once
// The selector stage's one-line summary of its saliency metrics (the JSON of isp::SaliencyReport::to_json).
#include <string>

#include "isp/registry/options.h"

namespace isp_selector {

// Prints "[stage] saliency on N test images: deletion AUC ..." to stderr; "n/a" for figures that are missing or
// null (the object figures of a dataset that defines no foreground).
void print_saliency_summary(const std::string& stage, const isp::json& saliency);

}  // namespace isp_selector
