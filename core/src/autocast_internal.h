#pragma once
// Inside isp_core: autocast's state, read the same way on LibTorch 1.13 and 2.x (core/src/accel.cpp).
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>

namespace isp {
// The dtype autocast casts eligible ops to on `device` now, or ScalarType::Undefined where autocast is off.
at::ScalarType autocast_dtype_for(c10::DeviceType device);
}  // namespace isp
