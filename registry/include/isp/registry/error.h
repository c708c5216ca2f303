#pragma once
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>

#include "isp/registry/api.h"

namespace isp {

// Where a value came from: the recipe file that set it and its JSON pointer ("/nodes/backbone/depth").
struct Where {
  std::string file;
  std::string pointer;
  // Finds the file (or "--set ...") that last wrote a pointer. A Where made by Recipe::where carries it, so a
  // child location names the source of the child's own value, not the file that created its parent object.
  std::shared_ptr<const std::function<std::string(const std::string&)>> locate;
  Where child(const std::string& key) const;
  Where child(std::size_t index) const;
  std::string str() const;  // "configs/x.json: /nodes/backbone/depth"
};

// A JSON-pointer reference token for `key` ("~" -> "~0", "/" -> "~1").
ISP_API std::string escape_pointer_token(const std::string& key);

// Every error the toolkit raises on purpose derives from isp::Error, so apps print one clean line.
class ISP_API Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
  ~Error() override;
};
class ISP_API RecipeError : public Error {
 public:
  RecipeError(const Where& where, const std::string& what);
  ~RecipeError() override;
  const Where& where() const { return where_; }
 private:
  Where where_;
};
class ISP_API UnknownComponent : public Error { public: using Error::Error; ~UnknownComponent() override; };
class ISP_API DuplicateComponent : public Error { public: using Error::Error; ~DuplicateComponent() override; };
// An unpinned, unscoped type name that more than one library offers (write scope::Name or Name@version).
class ISP_API AmbiguousComponent : public Error { public: using Error::Error; ~AmbiguousComponent() override; };
// A registration or plugin load after the registry was frozen (recipes are built from a fixed set).
class ISP_API RegistryFrozen : public Error { public: using Error::Error; ~RegistryFrozen() override; };
class ISP_API PluginLoadError : public Error { public: using Error::Error; ~PluginLoadError() override; };
class ISP_API DataError : public Error { public: using Error::Error; ~DataError() override; };
// A component's error about one of its own options. `option` is the option's key, or a key path into it
// ("widths/3"). BuildContext::build reports it at that option's JSON path, in the file (or --set) that gave the
// value, rather than at the node, whose object may come from a base recipe.
class ISP_API OptionError : public Error {
 public:
  OptionError(std::string option, const std::string& what) : Error(what), option_(std::move(option)) {}
  ~OptionError() override;
  const std::string& option() const { return option_; }

 private:
  std::string option_;
};

}  // namespace isp
