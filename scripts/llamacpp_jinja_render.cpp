// Renders a chat template with llama.cpp's own Jinja engine (common/jinja, what `llama-server --jinja`
// runs), the way common_chat_template_direct_apply_impl does, for scripts/check_gguf_llamacpp.py
// (--jinja-render). Usage: llamacpp_jinja_render TEMPLATE_FILE CONTEXT_JSON_FILE > rendered.txt
//
// Build against the llama.cpp sources (e.g. the vendor/llama.cpp of llama-cpp-python's sdist,
// `pip download --no-deps --no-binary :all: llama-cpp-python`), from that llama.cpp directory:
//   g++ -std=c++17 -O1 -I common -I vendor -I src -I include -I ggml/include \
//     PATH/TO/llamacpp_jinja_render.cpp common/jinja/{lexer,parser,runtime,value,string,caps}.cpp \
//     common/json.cpp common/unicode.cpp src/unicode.cpp src/unicode-data.cpp -o llamacpp_jinja_render
#include "jinja/lexer.h"
#include "jinja/parser.h"
#include "jinja/runtime.h"
#include "jinja/value.h"
#include "json.h"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>

// common/json.cpp asserts through ggml; this program links no ggml.
extern "C" void ggml_abort(const char * file, int line, const char * fmt, ...) {
    std::fprintf(stderr, "abort at %s:%d (%s)\n", file, line, fmt);
    std::abort();
}

static std::string slurp(const char * path) {
    std::ifstream f(path, std::ios::binary);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

int main(int argc, char ** argv) {
    if (argc != 3) {
        std::fprintf(stderr, "usage: %s TEMPLATE_FILE CONTEXT_JSON_FILE\n", argv[0]);
        return 2;
    }
    jinja::lexer lexer;
    auto lexed = lexer.tokenize(slurp(argv[1]));
    jinja::program prog = jinja::parse_from_tokens(lexed);
    jinja::context ctx(lexed.source);
    jinja::global_from_json(ctx, common_json::parse(slurp(argv[2])), false);
    jinja::runtime runtime(ctx);
    std::cout << jinja::runtime::gather_string_parts(runtime.execute(prog))->as_string().str();
    return 0;
}
