// Extracts every ```cpp block of the given Markdown files into one C++ file, so that the docs are compiled and cannot
// drift from the library. A block with `int main(` is a whole program (compiled in its own namespace, its main
// renamed). Any other block is a fragment: its declarations at brace depth 0 (struct, class, template, using,
// namespace aliases) go to namespace scope and its statements into a function whose parameters are the names the
// docs use without declaring them (context.hpp). Nothing is run: the test is that it compiles.
// A block right after a line `<!-- file: PATH -->` must equal that file of the repository (an archetype that a test
// also runs): the page cannot drift from the code that is tested.
// Usage: extract OUTPUT.cpp [--at-least N] FILE.md... ; prints the number of blocks found, and fails when there are
// fewer than N (so that a broken extraction cannot pass by compiling nothing).
#include <fstream>
#include <iterator>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace {
std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t");
  return b == std::string::npos ? "" : s.substr(b, s.find_last_not_of(" \t") - b + 1);
}

bool starts_with(const std::string& s, const std::string& prefix) { return s.rfind(prefix, 0) == 0; }

// The change in brace depth of a line, ignoring braces in string and character literals and // comments.
int depth_change(const std::string& line) {
  int change = 0;
  char quote = 0;
  for (std::size_t i = 0; i < line.size(); ++i) {
    const char c = line[i];
    if (quote) {
      if (c == '\\') ++i;
      else if (c == quote) quote = 0;
      continue;
    }
    if (c == '"' || c == '\'') quote = c;
    else if (c == '/' && i + 1 < line.size() && line[i + 1] == '/') break;
    else if (c == '{') ++change;
    else if (c == '}') --change;
  }
  return change;
}

// The code part of a line (without a trailing // comment), trimmed.
std::string code_of(const std::string& line) {
  const auto comment = line.find("//");
  return trim(comment == std::string::npos ? line : line.substr(0, comment));
}

bool is_declaration_start(const std::string& code) {
  for (const char* p : {"struct ", "class ", "template ", "template<", "using ", "namespace ", "TORCH_MODULE", "#include"}) {
    if (starts_with(code, p)) return true;
  }
  return false;
}
}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: extract OUTPUT.cpp FILE.md...\n";
    return 2;
  }
  std::ostringstream out;
  out << "// Generated from the docs by tests/doc_snippets/extract.cpp: every ```cpp block, compiled.\n"
      << "#include \"context.hpp\"\n\n";
  int blocks = 0, at_least = 1, first_file = 2;
  if (argc > 3 && std::string(argv[2]) == "--at-least") {
    at_least = std::stoi(argv[3]);
    first_file = 4;
  }
  for (int f = first_file; f < argc; ++f) {
    std::ifstream in(argv[f]);
    if (!in) {
      std::cerr << "extract: cannot read " << argv[f] << "\n";
      return 1;
    }
    std::string line, shown_file, previous;
    int line_number = 0, start = 0;
    bool inside = false;
    std::vector<std::string> block;
    while (std::getline(in, line)) {
      ++line_number;
      if (!inside && starts_with(line, "```cpp")) {
        inside = true;
        start = line_number;
        block.clear();
        shown_file.clear();
        if (starts_with(previous, "<!-- file: ")) shown_file = trim(previous.substr(11, previous.find("-->") - 11));
        continue;
      }
      previous = line;
      if (inside && starts_with(line, "```")) {
        inside = false;
        ++blocks;
        const std::string name = "doc_snippet_" + std::to_string(blocks);
        out << "// " << argv[f] << ":" << start << "\n#line " << start + 1 << " \"" << argv[f] << "\"\n";
        if (!shown_file.empty()) {
          std::ifstream file(shown_file);
          std::string content((std::istreambuf_iterator<char>(file)), {}), shown;
          for (const auto& l : block) shown += l + "\n";
          if (!file || content != shown) {
            std::cerr << argv[f] << ":" << start << ": the block differs from " << shown_file
                      << ", which it says it shows\n";
            return 1;
          }
        }
        bool whole = false;
        for (const auto& l : block) whole = whole || l.find("int main(") != std::string::npos;
        if (whole) {
          out << "namespace " << name << " {\n#define main " << name << "_main\n";
          for (const auto& l : block) out << l << "\n";
          out << "#undef main\n}  // namespace " << name << "\n\n";
          continue;
        }
        std::ostringstream declarations, statements;
        int depth = 0;
        bool in_declaration = false, in_unit = false;
        for (const auto& l : block) {
          const auto code = code_of(l);
          if (!in_unit && depth == 0 && !code.empty()) {
            in_unit = true;
            in_declaration = is_declaration_start(code);
          }
          (in_declaration ? declarations : statements) << l << "\n";
          depth += depth_change(l);
          if (in_unit && depth == 0 && !code.empty() && (code.back() == ';' || code.back() == '}') &&
              !(in_declaration && code.back() == '}' && starts_with(code, "template"))) {
            in_unit = false;
          }
          if (!in_unit) in_declaration = false;
        }
        out << "namespace " << name << " {\nusing namespace doc_context;\n" << declarations.str()
            << "[[maybe_unused]] void run(DOC_CONTEXT_PARAMETERS) {\n{\n" << statements.str() << "}\n}\n}  // namespace "
            << name << "\n\n";
      } else if (inside) {
        block.push_back(line);
      }
    }
    if (inside) {
      std::cerr << "extract: " << argv[f] << ":" << start << ": a ```cpp block that never ends\n";
      return 1;
    }
  }
  std::cout << "extract: " << blocks << " C++ blocks\n";
  if (blocks < at_least) {
    std::cerr << "extract: expected at least " << at_least << " C++ blocks\n";
    return 1;
  }
  std::ofstream(argv[1]) << out.str();
  return 0;
}
