// The selector stage's saliency summary line, apart from the stage's training code.
#include "saliency_summary.h"

#include <cstdio>

#include "isp/registry/number_text.h"

namespace isp_selector {

void print_saliency_summary(const std::string& stage, const isp::json& s) {
  // A figure by its JSON pointer, "n/a" where it is missing or null.
  auto num = [&s](const char* pointer, int digits = 3) {
    return isp::fixed_or_na(s.value(isp::json::json_pointer(pointer), isp::json()), digits);
  };
  std::fprintf(stderr,
               "[%s] saliency on %lld test images: deletion AUC %s (random %s, centred Gaussian %s), insertion AUC "
               "%s (random %s, centred %s), mass on object %s (foreground share %s, centred Gaussian %s), "
               "centre spread row %s px, col %s px (the objects' own: %s / %s px), centre to object %s px (image "
               "centre to object %s px)\n",
               stage.c_str(), static_cast<long long>(s.value("images", 0)), num("/deletion_auc").c_str(),
               num("/random_order/deletion_auc").c_str(), num("/centred_gaussian/deletion_auc").c_str(),
               num("/insertion_auc").c_str(), num("/random_order/insertion_auc").c_str(),
               num("/centred_gaussian/insertion_auc").c_str(), num("/mass_on_object").c_str(),
               num("/foreground_share").c_str(), num("/mass_on_object_centred_gaussian").c_str(),
               num("/centre_std_row_px", 2).c_str(), num("/centre_std_col_px", 2).c_str(),
               num("/object_centroid_std_row_px", 2).c_str(), num("/object_centroid_std_col_px", 2).c_str(),
               num("/centre_to_object_px", 2).c_str(), num("/image_centre_to_object_px", 2).c_str());
}

}  // namespace isp_selector
