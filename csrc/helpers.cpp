// C++ twins of the hot numpy helpers in megatron_cmbert/data/helpers.py.
// Each function here has a numpy implementation with the same name and contract; a test
// checks that both give identical output. Keep the two in step.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace py = pybind11;

using I64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using U8Array = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>;

// flags[t] = 1 when token t starts a whole-word unit:
//   - the first token of each document, or
//   - its start offset is a segmenter word boundary (char_is_start[start] != 0) and differs from
//     the previous token's start (byte-fallback pieces of one character share a start offset).
// token_starts: global character offsets (documents concatenated), doc_token_offsets: [0, n0, n0+n1, ...].
U8Array word_start_flags(const I64Array& token_starts, const I64Array& doc_token_offsets,
                         const U8Array& char_is_start) {
    const auto n_tokens = token_starts.size();
    const auto n_bounds = doc_token_offsets.size();
    const auto n_chars = char_is_start.size();
    if (n_bounds < 1) throw std::invalid_argument("doc_token_offsets must hold at least one entry");
    const int64_t* starts = token_starts.data();
    const int64_t* offs = doc_token_offsets.data();
    const uint8_t* is_start = char_is_start.data();
    if (offs[0] != 0 || offs[n_bounds - 1] != static_cast<int64_t>(n_tokens))
        throw std::invalid_argument("doc_token_offsets must start at 0 and end at len(token_starts)");

    U8Array out(static_cast<py::ssize_t>(n_tokens));
    uint8_t* flags = out.mutable_data();
    {
        py::gil_scoped_release release;
        for (py::ssize_t d = 0; d + 1 < static_cast<py::ssize_t>(n_bounds); ++d) {
            const int64_t lo = offs[d], hi = offs[d + 1];
            if (lo > hi) throw std::invalid_argument("doc_token_offsets must be non-decreasing");
            for (int64_t t = lo; t < hi; ++t) {
                const int64_t s = starts[t];
                if (s < 0 || s >= static_cast<int64_t>(n_chars))
                    throw std::out_of_range("token start " + std::to_string(s) + " outside the text");
                if (t == lo) {
                    flags[t] = 1;
                } else {
                    flags[t] = (is_start[s] != 0 && s != starts[t - 1]) ? 1 : 0;
                }
            }
        }
    }
    return out;
}

PYBIND11_MODULE(_C, m) {
    m.doc() = "C++ helpers for megatron_cmbert (optional; numpy twins in megatron_cmbert.data.helpers)";
    m.def("word_start_flags", &word_start_flags, py::arg("token_starts"),
          py::arg("doc_token_offsets"), py::arg("char_is_start"),
          "uint8 flags: 1 where a token starts a whole-word unit");
}
