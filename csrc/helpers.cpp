// C++ twins of the hot numpy helpers in megatron_cmbert/data/helpers.py.
// Each function here has a numpy implementation with the same name and contract; a test
// checks that both give identical output. Keep the two in step.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

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

// Greedy sequential packing of documents into samples of at most seq_length tokens, each document
// piece costing its length + 2 ([CLS], [SEP]); see pack_chunk_python for the rules. Streaming: packs
// order[0..n) into a sample that already holds `used` tokens, so a long order can be packed chunk by
// chunk without holding all pieces in memory. Pieces are int32 (document, start, length): documents
// and lengths come from int32 .idx arrays. Returns (pieces int32 (n, 3), sample ends int64: the local
// piece count at each sample close, used tokens of the open sample).
using I32Array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

py::tuple pack_chunk(const I32Array& doc_lengths, const I64Array& order, int64_t seq_length,
                     int64_t min_piece, int64_t used) {
    constexpr int64_t kOverhead = 2;
    const int32_t* lengths = doc_lengths.data();
    const int64_t* ord = order.data();
    const auto n_docs = doc_lengths.size();
    const auto n_order = order.size();
    if (n_docs > INT32_MAX) throw std::invalid_argument("more than 2^31 documents");
    std::vector<int32_t> pieces;
    std::vector<int64_t> ends;
    {
        py::gil_scoped_release release;
        for (py::ssize_t k = 0; k < n_order; ++k) {
            const int64_t doc = ord[k];
            if (doc < 0 || doc >= n_docs) throw std::out_of_range("document index outside doc_lengths");
            int64_t start = 0, remaining = lengths[doc];
            while (remaining > 0) {
                const int64_t space = seq_length - used - kOverhead;
                if (used && space < std::min(min_piece, remaining)) {
                    ends.push_back(static_cast<int64_t>(pieces.size() / 3));  // a sliver: close the sample
                    used = 0;
                    continue;
                }
                const int64_t take = std::min(remaining, space);
                pieces.insert(pieces.end(), {static_cast<int32_t>(doc), static_cast<int32_t>(start),
                                             static_cast<int32_t>(take)});
                used += take + kOverhead;
                start += take;
                remaining -= take;
                if (seq_length - used - kOverhead <= 0) {
                    ends.push_back(static_cast<int64_t>(pieces.size() / 3));
                    used = 0;
                }
            }
        }
    }
    const auto n_pieces = static_cast<py::ssize_t>(pieces.size() / 3);
    py::array_t<int32_t> out_pieces({n_pieces, static_cast<py::ssize_t>(3)});
    std::copy(pieces.begin(), pieces.end(), out_pieces.mutable_data());
    py::array_t<int64_t> out_ends(static_cast<py::ssize_t>(ends.size()));
    std::copy(ends.begin(), ends.end(), out_ends.mutable_data());
    return py::make_tuple(out_pieces, out_ends, used);
}

// Megatron's blending for global samples start .. start+n-1: sample i goes to the dataset d with the
// largest w[d] * (i + 1) - counts[d] (first on ties). `counts` (samples given to each dataset before
// `start`) is updated in place. Returns (dataset int16 (n), index within the dataset int64 (n)).
py::tuple blend_block(const py::array_t<double, py::array::c_style | py::array::forcecast>& weights,
                      py::array_t<int64_t, py::array::c_style>& counts, int64_t start, int64_t n) {
    const auto n_sets = weights.size();
    if (counts.size() != n_sets) throw std::invalid_argument("counts and weights differ in length");
    if (n_sets < 1 || n_sets > 32767) throw std::invalid_argument("need 1 to 32767 datasets");
    const double* w = weights.data();
    int64_t* c = counts.mutable_data();
    py::array_t<int16_t> dataset(static_cast<py::ssize_t>(n));
    py::array_t<int64_t> within(static_cast<py::ssize_t>(n));
    int16_t* ds = dataset.mutable_data();
    int64_t* wi = within.mutable_data();
    {
        py::gil_scoped_release release;
        for (int64_t k = 0; k < n; ++k) {
            const double next = static_cast<double>(start + k + 1);
            py::ssize_t best = 0;
            double best_err = w[0] * next - static_cast<double>(c[0]);
            for (py::ssize_t d = 1; d < n_sets; ++d) {
                const double err = w[d] * next - static_cast<double>(c[d]);
                if (err > best_err) { best_err = err; best = d; }
            }
            ds[k] = static_cast<int16_t>(best);
            wi[k] = c[best]++;
        }
    }
    return py::make_tuple(dataset, within);
}

PYBIND11_MODULE(_C, m) {
    m.doc() = "C++ helpers for megatron_cmbert (optional; numpy twins in megatron_cmbert.data.helpers)";
    m.def("word_start_flags", &word_start_flags, py::arg("token_starts"),
          py::arg("doc_token_offsets"), py::arg("char_is_start"),
          "uint8 flags: 1 where a token starts a whole-word unit");
    m.def("pack_chunk", &pack_chunk, py::arg("doc_lengths"), py::arg("order"), py::arg("seq_length"),
          py::arg("min_piece"), py::arg("used"),
          "(pieces, sample ends, used) of greedy [CLS] piece [SEP] packing, continuing an open sample");
    m.def("blend_block", &blend_block, py::arg("weights"), py::arg("counts"), py::arg("start"), py::arg("n"),
          "(dataset, index within dataset) of samples start..start+n-1; updates counts in place");
}
