#pragma once
// Symbols of libisp_core.so that plugins and apps may use. Plugins themselves build with hidden visibility.
#define ISP_API __attribute__((visibility("default")))
