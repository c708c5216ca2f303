#pragma once
// Private to the registry layer: one loaded plugin library.
#include <string>

#include <boost/dll/shared_library.hpp>

#include "isp/registry/plugin.h"

namespace isp {

struct LoadedLibrary {
  std::string path;
  std::string hash;  // FNV-1a of the file's bytes: recorded with every component built from it
  IspPluginDescriptor descriptor{};
  boost::dll::shared_library lib;
};

}  // namespace isp
