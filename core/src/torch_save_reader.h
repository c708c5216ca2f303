#pragma once
// Inside isp_core: the tensors of a file written by Python's torch.save (zip format), read without LibTorch's
// TorchScript unpickler (core/src/torch_save_reader.cpp says why).
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

namespace isp {
// The top-level {name: tensor} dict (a dict or an OrderedDict, as model.state_dict() is) in file order. A value
// that is not a tensor, or anything else at the top, is an Error naming `path`.
std::vector<std::pair<std::string, at::Tensor>> read_torch_save_state_dict(const std::string& path);
}  // namespace isp
