// Recipe loading: mmengine-style `_base_` inheritance in JSON, overrides and variables ($ref checks are in
// references.cpp).
#include "isp/registry/recipe.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
#include <sstream>

namespace fs = std::filesystem;

namespace isp {

namespace {
std::string canonical_or_normal(const fs::path& p) {
  std::error_code ec;
  fs::path c = fs::weakly_canonical(p, ec);
  return ec ? p.lexically_normal().string() : c.string();
}
}  // namespace

// The origin of `pointer`: the entry for it or for its closest ancestor (a value written whole).
static std::string origin_of(const std::map<std::string, std::string>& origins, const std::string& top_file,
                             const std::string& pointer) {
  std::string p = pointer;
  while (true) {
    auto it = origins.find(p);
    if (it != origins.end()) return it->second;
    if (p.empty()) break;
    auto slash = p.rfind('/');
    p = slash == std::string::npos ? "" : p.substr(0, slash);
  }
  return top_file;
}

// Input decides how deep recipes nest, so every recursion over them is bounded: nesting, `_base_` chains
// and `$ref` chains stop with an error at these limits instead of overflowing the stack.
bool json_nests_deeper_than(const std::string& text, int limit) {
  int depth = 0;
  bool in_string = false;
  for (std::size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\') ++i;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '{' || c == '[') {
      if (++depth > limit) return true;
    } else if (c == '}' || c == ']') {
      --depth;
    }
  }
  return false;
}

static json parse_bounded(const std::string& text, const std::string& file) {
  if (json_nests_deeper_than(text, kMaxRecipeNesting))
    throw RecipeError({file, ""}, "nested deeper than " + std::to_string(kMaxRecipeNesting) +
                                      " objects/arrays; recipes are limited to that depth");
  try {
    return json::parse(text);
  } catch (const json::parse_error&) {
    throw;  // callers add their context (a --set value that is not JSON is a bare string)
  } catch (const json::exception& e) {
    // Syntactically JSON but not representable, e.g. a number beyond double (found by bench/fuzz.sh).
    throw RecipeError({file, ""}, std::string("invalid JSON: ") + e.what());
  }
}

Where Recipe::where(const std::string& pointer) const {
  if (!locate_ || located_size_ != origins.size()) {
    auto snapshot = std::make_shared<const std::map<std::string, std::string>>(origins);
    locate_ = std::make_shared<const std::function<std::string(const std::string&)>>(
        [snapshot, top = file](const std::string& p) { return origin_of(*snapshot, top, p); });
    located_size_ = origins.size();
  }
  return Where{origin_of(origins, file, pointer), pointer, locate_};
}

static void record_all(const json& v, const std::string& file, const std::string& pointer,
                       std::map<std::string, std::string>* origins) {
  if (!origins) return;
  // Drop stale origins below this pointer: the value was replaced whole.
  for (auto it = origins->lower_bound(pointer + "/"); it != origins->end() && it->first.rfind(pointer + "/", 0) == 0;)
    it = origins->erase(it);
  (*origins)[pointer] = file;
  if (v.is_object())
    for (auto it = v.begin(); it != v.end(); ++it) record_all(it.value(), file, pointer + "/" + escape_pointer_token(it.key()), origins);
  else if (v.is_array())
    for (std::size_t i = 0; i < v.size(); ++i) record_all(v[i], file, pointer + "/" + std::to_string(i), origins);
}

static json strip_delete(const json& v) {
  if (v.is_object()) {
    json out = json::object();
    for (auto it = v.begin(); it != v.end(); ++it)
      if (it.key() != "_delete_") out[it.key()] = strip_delete(it.value());
    return out;
  }
  if (v.is_array()) {
    json out = json::array();
    for (const auto& e : v) out.push_back(strip_delete(e));
    return out;
  }
  return v;
}

void merge_into(json& base, const json& child, const std::string& file, const std::string& pointer,
                std::map<std::string, std::string>* origins) {
  if (!child.is_object() || !base.is_object()) {
    base = strip_delete(child);
    record_all(base, file, pointer, origins);
    return;
  }
  auto del = child.find("_delete_");
  if (del != child.end()) {
    if (!del->is_boolean()) throw RecipeError({file, pointer + "/_delete_"}, "expected true or false, got " + del->dump());
    if (del->get<bool>()) {
      base = strip_delete(child);
      record_all(base, file, pointer, origins);
      return;
    }
  }
  if (origins && !origins->count(pointer)) (*origins)[pointer] = file;
  for (auto it = child.begin(); it != child.end(); ++it) {
    if (it.key() == "_delete_") continue;
    std::string p = pointer + "/" + escape_pointer_token(it.key());
    auto bit = base.find(it.key());
    if (bit != base.end() && bit->is_object() && it->is_object()) {
      merge_into(*bit, it.value(), file, p, origins);
    } else {
      if (bit == base.end() || !it->is_object()) {
        base[it.key()] = strip_delete(it.value());
        record_all(base[it.key()], file, p, origins);
      } else {
        // a child object over a non-object base value replaces it
        base[it.key()] = strip_delete(it.value());
        record_all(base[it.key()], file, p, origins);
      }
    }
  }
}

// The folder of the recipes shipped with isp: `_base_: "isp://isp/quick_fmnist.json"` names a file in it.
std::string shipped_config_dir() {
  if (const char* env = std::getenv("ISP_CONFIG_DIR"); env && *env) return env;
  std::error_code ec;
  fs::path exe = fs::read_symlink("/proc/self/exe", ec);
#ifdef ISP_INSTALL_CONFIG_SUBDIR
  if (!ec) {
    fs::path installed = (exe.parent_path() / ".." / ISP_INSTALL_CONFIG_SUBDIR).lexically_normal();
    if (fs::is_directory(installed)) return installed.string();
  }
#endif
#ifdef ISP_SOURCE_CONFIG_DIR
  if (fs::is_directory(ISP_SOURCE_CONFIG_DIR)) return ISP_SOURCE_CONFIG_DIR;  // running from the build tree
#endif
  return "";
}

static fs::path base_path(const fs::path& file, const std::string& entry, const Where& where) {
  static const std::string kShipped = "isp://";
  if (entry.rfind(kShipped, 0) == 0) {
    const std::string dir = shipped_config_dir();
    if (dir.empty())
      throw RecipeError(where, "'" + entry + "' names a shipped recipe, but no isp configs folder was found (set ISP_CONFIG_DIR)");
    return (fs::path(dir) / entry.substr(kShipped.size())).lexically_normal();
  }
  return (file.parent_path() / entry).lexically_normal();
}

static json load_with_bases(const fs::path& file, json doc, std::vector<std::string>& stack,
                            std::map<std::string, std::string>* origins) {
  const std::string fname = file.string();
  if (!doc.is_object()) throw RecipeError({fname, ""}, "a recipe must be a JSON object");
  json merged = json::object();
  auto bases = doc.find("_base_");
  if (bases != doc.end()) {
    std::vector<std::string> list;
    if (bases->is_string()) list.push_back(bases->get<std::string>());
    else if (bases->is_array()) {
      for (std::size_t i = 0; i < bases->size(); ++i) {
        if (!(*bases)[i].is_string())
          throw RecipeError({fname, "/_base_/" + std::to_string(i)}, "expected a file path string, got " + (*bases)[i].dump());
        list.push_back((*bases)[i].get<std::string>());
      }
    } else {
      throw RecipeError({fname, "/_base_"}, "expected a path or a list of paths, got " + bases->dump());
    }
    for (std::size_t i = 0; i < list.size(); ++i) {
      std::string where_ptr = bases->is_array() ? "/_base_/" + std::to_string(i) : "/_base_";
      fs::path bp = base_path(file, list[i], {fname, where_ptr});
      // error_code overloads: a path the OS rejects (too long, say) is "not found" with its reason, not a
      // filesystem_error escaping (found by bench/fuzz.sh).
      std::error_code ec;
      if (!fs::is_regular_file(bp, ec))
        throw RecipeError({fname, where_ptr}, "base recipe not found" + (ec ? " (" + ec.message() + ")" : std::string()) +
                                                  ": " + bp.string());
      std::string canon = canonical_or_normal(bp);
      for (const auto& s : stack)
        if (s == canon) throw RecipeError({fname, where_ptr}, "_base_ cycle: " + canon + " includes itself");
      json bdoc;
      try {
        bdoc = parse_bounded(read_text_file(bp.string()), bp.string());
      } catch (const json::parse_error& e) {
        throw RecipeError({bp.string(), ""}, std::string("invalid JSON: ") + e.what());
      }
      if (static_cast<int>(stack.size()) >= kMaxBaseChain)
        throw RecipeError({fname, where_ptr}, "_base_ chain longer than " + std::to_string(kMaxBaseChain) + " files");
      stack.push_back(canon);
      json b = load_with_bases(bp, std::move(bdoc), stack, origins);
      stack.pop_back();
      merge_into(merged, b, bp.string(), "", nullptr);
    }
    doc.erase("_base_");
  }
  merge_into(merged, doc, fname, "", origins);
  return merged;
}

// Recomputes origins after base merging: files deeper in the chain were merged without tracking, so we
// track the whole chain in a second pass that replays merges with origins on.
static void track_origins(const fs::path& file, const json& raw, std::vector<std::string>& stack, json& acc,
                          std::map<std::string, std::string>& origins) {
  auto bases = raw.find("_base_");
  if (bases != raw.end()) {
    std::vector<std::string> list;
    if (bases->is_string()) list.push_back(bases->get<std::string>());
    else for (const auto& b : *bases) list.push_back(b.get<std::string>());
    for (const auto& b : list) {
      fs::path bp = base_path(file, b, {file.string(), "/_base_"});
      json bdoc = parse_bounded(read_text_file(bp.string()), bp.string());
      stack.push_back(canonical_or_normal(bp));
      track_origins(bp, bdoc, stack, acc, origins);
      stack.pop_back();
    }
  }
  json body = raw;
  body.erase("_base_");
  merge_into(acc, body, file.string(), "", &origins);
}

namespace {
// JSON strings must be UTF-8 (nlohmann checks only when writing): text from the command line or the environment
// is checked when it enters a recipe, so a bad byte is an error naming its source, not a crash at the next dump.
void require_utf8(const std::string& text, const std::string& what) {
  try {
    (void)json(text).dump();
  } catch (const json::type_error& e) {
    const std::string why = e.what();
    const auto at = why.find("invalid UTF-8");
    throw Error(what + ": not valid UTF-8 (" + (at == std::string::npos ? why : why.substr(at)) + ")");
  }
}
}  // namespace

void apply_override(json& doc, const std::string& assignment, std::map<std::string, std::string>* origins) {
  require_utf8(assignment, "--set argument");
  auto eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0)
    throw Error("--set " + assignment + ": expected KEY.PATH=VALUE (e.g. nodes.backbone.depth=20)");
  std::string path = assignment.substr(0, eq), text = assignment.substr(eq + 1);
  json value;
  try {
    value = parse_bounded(text, "--set " + assignment);
  } catch (const json::parse_error&) {
    value = text;  // bare words are strings: --set nodes.backbone.type=ResNetCifar
  }
  std::vector<std::string> keys;
  std::stringstream ss(path);
  for (std::string k; std::getline(ss, k, '.');) keys.push_back(k);
  json* cur = &doc;
  std::string pointer;
  for (std::size_t i = 0; i < keys.size(); ++i) {
    const std::string& k = keys[i];
    bool last = i + 1 == keys.size();
    if (cur->is_array()) {
      char* end = nullptr;
      long idx = std::strtol(k.c_str(), &end, 10);
      if (k.empty() || *end != '\0' || idx < 0 || static_cast<std::size_t>(idx) >= cur->size())
        throw Error("--set " + assignment + ": '" + k + "' is not a valid index into the list at " +
                    (pointer.empty() ? "/" : pointer) + " (size " + std::to_string(cur->size()) + ")");
      pointer += "/" + k;
      cur = &(*cur)[static_cast<std::size_t>(idx)];
    } else {
      if (cur->is_null()) *cur = json::object();
      if (!cur->is_object())
        throw Error("--set " + assignment + ": " + (pointer.empty() ? "/" : pointer) + " is a " + cur->type_name() +
                    ", cannot set key '" + k + "' inside it");
      pointer += "/" + escape_pointer_token(k);
      cur = &(*cur)[k];
    }
    if (last) {
      *cur = value;
      record_all(*cur, "--set " + assignment, pointer, origins);
    }
  }
}

static std::string expand_string(const std::string& s, const std::map<std::string, std::string>& vars,
                                 const Recipe& r, const std::string& pointer) {
  std::string out;
  std::size_t i = 0;
  while (i < s.size()) {
    if (s[i] == '$' && i + 1 < s.size() && s[i + 1] == '{') {
      auto close = s.find('}', i + 2);
      if (close == std::string::npos) throw RecipeError(r.where(pointer), "unterminated ${ in \"" + s + "\"");
      std::string inner = s.substr(i + 2, close - i - 2);
      std::string name = inner, fallback;
      bool has_default = false;
      auto dflt = inner.find(":-");
      if (dflt != std::string::npos) name = inner.substr(0, dflt), fallback = inner.substr(dflt + 2), has_default = true;
      std::string value;
      if (auto it = vars.find(name); it != vars.end()) value = it->second;
      else if (const char* env = std::getenv(name.c_str())) {
        value = env;
        require_utf8(value, r.where(pointer).str() + ": environment variable " + name);
      }
      else if (has_default) value = fallback;
      else throw RecipeError(r.where(pointer), "undefined variable ${" + name + "} (set it in the environment, in the recipe's \"vars\", or write ${" + name + ":-default})");
      out += value;
      i = close + 1;
    } else {
      out += s[i++];
    }
  }
  return out;
}

static void expand_rec(json& v, const std::map<std::string, std::string>& vars, const Recipe& r, const std::string& ptr) {
  if (v.is_string()) {
    std::string s = v.get<std::string>();
    if (s.find("${") != std::string::npos) v = expand_string(s, vars, r, ptr);
  } else if (v.is_object()) {
    for (auto it = v.begin(); it != v.end(); ++it) expand_rec(it.value(), vars, r, ptr + "/" + escape_pointer_token(it.key()));
  } else if (v.is_array()) {
    for (std::size_t i = 0; i < v.size(); ++i) expand_rec(v[i], vars, r, ptr + "/" + std::to_string(i));
  }
}

void expand_variables(json& doc, const std::map<std::string, std::string>& vars_in, const Recipe& r) {
  std::map<std::string, std::string> vars = vars_in;
  if (auto it = doc.find("vars"); it != doc.end()) {
    if (!it->is_object()) throw RecipeError(r.where("/vars"), "expected an object of strings");
    for (auto v = it->begin(); v != it->end(); ++v)
      vars[v.key()] = v->is_string() ? v->get<std::string>() : v->dump();
  }
  expand_rec(doc, vars, r, "");
}

Recipe recipe_from_json(json doc, const std::string& pretend_file, const std::string& base_dir,
                        const std::vector<std::string>& overrides) {
  Recipe r;
  r.file = pretend_file;
  fs::path file = fs::path(base_dir) / fs::path(pretend_file).filename();
  std::vector<std::string> stack{canonical_or_normal(file)};
  json merged = load_with_bases(file, doc, stack, nullptr);
  (void)merged;
  json acc = json::object();
  track_origins(file, doc, stack, acc, r.origins);
  // origins recorded with the real path of the top-level file; show it as the caller named it
  for (auto& [p, f] : r.origins)
    if (f == file.string()) f = pretend_file;
  r.doc = std::move(acc);
  std::map<std::string, std::string> vars{{"RECIPE_DIR", fs::absolute(base_dir).string()}};
  expand_variables(r.doc, vars, r);
  for (const auto& o : overrides) apply_override(r.doc, o, &r.origins);
  r.origins_changed();
  check_references(r);
  return r;
}

Recipe load_recipe(const std::string& path, const std::vector<std::string>& overrides) {
  std::error_code ec;
  if (!fs::is_regular_file(path, ec))
    throw Error(path + ": recipe file not found" + (ec ? " (" + ec.message() + ")" : std::string()));
  json doc;
  try {
    doc = parse_bounded(read_text_file(path), path);
  } catch (const json::parse_error& e) {
    throw RecipeError({path, ""}, std::string("invalid JSON: ") + e.what());
  }
  fs::path p(path);
  std::string dir = p.has_parent_path() ? p.parent_path().string() : ".";
  Recipe r = recipe_from_json(std::move(doc), path, dir, overrides);
  return r;
}

}  // namespace isp
