// attnkit attention kernel: the Python entry points. Checks what Python hands over (so a
// wrong call is an error, never a crash), fills Args and dispatches on the dtype.
//
//   forward(q, k, v, scale, mask, scores, sinks, want_single) -> (out, lse, single)
//   backward(dout, q, k, v, lse, delta, single, scale, mask, scores, dq, dk, dv, dbias)
//   isa() -> the instruction set this library was built for; tile() -> (BQ, BK)
//
// mask = (iv, kind, bits, slot), scores = (ops, cap, slopes, pos, bias, cap_after_bias): see
// _attn_plan.h. Tensors the kernel reads in the accumulation dtype (slopes, pos, bias, sinks,
// lse, delta) must already be in it: float32, or float64 for float64 inputs.

// Not <torch/extension.h>: it pulls in all of torch's C++ API (a minute of compile time).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/utils/pybind.h>

#include "_attn_plan.h"

namespace attnkit_kernel {
template <typename S> void forward_impl(const Args&);
template <typename S> void backward_impl(const Args&);
}  // namespace attnkit_kernel

using namespace attnkit_kernel;
using at::Tensor;
using OptT = std::optional<Tensor>;

namespace {

at::ScalarType acc_type(const Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_rows(const Tensor& t, const char* name, at::ScalarType dt) {
  TORCH_CHECK(t.dim() == 4, "attnkit kernel: ", name, " must be 4-D, got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dt, "attnkit kernel: ", name, " must be ", dt, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.size(3) == 0 || t.stride(3) == 1, "attnkit kernel: ", name,
              " needs a contiguous last dim");
}

void strides3(const Tensor& t, int64_t* s) {
  for (int d = 0; d < 3; ++d) s[d] = t.stride(d);
}

bool given(const OptT& t) { return t.has_value() && t->defined(); }

Args common(const Tensor& q, const Tensor& k, const Tensor& v, double scale,
            const std::vector<OptT>& mask, const std::vector<OptT>& score_tensors,
            const std::vector<int64_t>& ops, double cap, bool cap_after_bias) {
  const auto dt = q.scalar_type(), acc = acc_type(q);
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              "attnkit kernel: unsupported dtype ", dt);
  check_rows(q, "q", dt);
  check_rows(k, "k", dt);
  check_rows(v, "v", dt);
  Args a;
  a.B = q.size(0);
  a.H = q.size(1);
  a.T = q.size(2);
  a.D = q.size(3);
  a.Hkv = k.size(1);
  a.S = k.size(2);
  a.Dv = v.size(3);
  TORCH_CHECK(k.size(0) == a.B && v.size(0) == a.B && k.size(3) == a.D && v.size(1) == a.Hkv &&
                  v.size(2) == a.S && a.Hkv > 0 && a.H % a.Hkv == 0,
              "attnkit kernel: q, k, v shapes do not fit: ", q.sizes(), k.sizes(), v.sizes());
  TORCH_CHECK(a.T < (1 << 24) && a.S < (1 << 24), "attnkit kernel: lengths must be < 2^24");
  a.G = a.H / a.Hkv;
  a.nQ = (a.T + BQ - 1) / BQ;
  a.nK = (a.S + BK - 1) / BK;
  a.scale = scale;
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  strides3(q, a.qs);
  strides3(k, a.ks);
  strides3(v, a.vs);
  TORCH_CHECK(mask.size() == 4 && score_tensors.size() == 3,
              "attnkit kernel: mask is (iv, kind, bits, slot), scores (slopes, pos, bias)");
  if (given(mask[0])) {
    const Tensor& iv = *mask[0];
    TORCH_CHECK(iv.scalar_type() == at::kInt && iv.dim() == 4 && iv.size(2) == a.T &&
                    (iv.size(3) == 2 || iv.size(3) == 4) && iv.stride(3) == 1 &&
                    (iv.size(0) == 1 || iv.size(0) == a.B) &&
                    (iv.size(1) == 1 || iv.size(1) == a.H),
                "attnkit kernel: intervals must be int32 (B|1, H|1, T, 2|4), got ",
                iv.scalar_type(), " ", iv.sizes());
    a.iv = iv.data_ptr<int32_t>();
    strides3(iv, a.ivs);
    a.Bi = iv.size(0);
    a.Hi = iv.size(1);
    a.ni = int(iv.size(3) / 2);
  }
  if (given(mask[1])) {
    const Tensor& kind = *mask[1];
    TORCH_CHECK(kind.scalar_type() == at::kChar && kind.is_contiguous() && kind.dim() == 2 &&
                    kind.size(0) == a.nQ && kind.size(1) == a.nK,
                "attnkit kernel: kind must be int8 (nQ, nK) = (", a.nQ, ", ", a.nK, ")");
    a.kind = kind.data_ptr<int8_t>();
  }
  if (given(mask[2])) {
    const Tensor& bits = *mask[2];
    TORCH_CHECK(given(mask[3]), "attnkit kernel: bits need their slot table");
    const Tensor& slot = *mask[3];
    TORCH_CHECK(bits.scalar_type() == at::kLong && bits.dim() == 4 && bits.size(3) == BQ &&
                    bits.stride(3) == 1 && (bits.size(1) == 1 || bits.size(1) == a.B) &&
                    (bits.size(2) == 1 || bits.size(2) == a.H),
                "attnkit kernel: bits must be int64 (P, B|1, H|1, ", BQ, "), got ", bits.sizes());
    TORCH_CHECK(slot.scalar_type() == at::kInt && slot.is_contiguous() && slot.dim() == 2 &&
                    slot.size(0) == a.nQ && slot.size(1) == a.nK,
                "attnkit kernel: slot must be int32 (nQ, nK)");
    const int32_t mx = slot.numel() ? slot.max().item<int32_t>() : -1;
    TORCH_CHECK(mx < bits.size(0), "attnkit kernel: slot points past the bits");
    a.bits = bits.data_ptr<int64_t>();
    a.bitss[0] = bits.stride(0);
    a.bitss[1] = bits.size(1) == 1 ? 0 : bits.stride(1);
    a.bitss[2] = bits.size(2) == 1 ? 0 : bits.stride(2);
    a.slot = slot.data_ptr<int32_t>();
  }
  TORCH_CHECK(ops.size() <= 3, "attnkit kernel: at most three score functions");
  a.nops = int(ops.size());
  for (size_t o = 0; o < ops.size(); ++o) {
    TORCH_CHECK(ops[o] >= OP_SOFTCAP && ops[o] <= OP_BIAS, "attnkit kernel: unknown op ", ops[o]);
    a.ops[o] = int(ops[o]);
    const OptT& need = ops[o] == OP_ALIBI ? score_tensors[0] : score_tensors[2];
    if (ops[o] == OP_SOFTCAP) {
      TORCH_CHECK(cap > 0, "attnkit kernel: softcap must be > 0");
    } else {
      TORCH_CHECK(given(need), "attnkit kernel: a score op without its tensor");
    }
  }
  a.cap = cap;
  a.cap_after_bias = cap_after_bias;
  if (given(score_tensors[0])) {
    TORCH_CHECK(given(score_tensors[1]), "attnkit kernel: ALiBi needs its positions");
    const Tensor& sl = *score_tensors[0];
    const Tensor& pos = *score_tensors[1];
    TORCH_CHECK(sl.scalar_type() == acc && sl.is_contiguous() && sl.numel() == a.H &&
                    pos.scalar_type() == acc && pos.is_contiguous() && pos.numel() == a.T,
                "attnkit kernel: ALiBi slopes (H,) and positions (T,) in ", acc);
    a.slopes = sl.data_ptr();
    a.pos = pos.data_ptr();
  }
  if (given(score_tensors[2])) {
    const Tensor& bias = *score_tensors[2];
    TORCH_CHECK(bias.scalar_type() == acc && bias.dim() == 4 && bias.size(0) == a.B &&
                    bias.size(1) == a.H && bias.size(2) == a.T && bias.size(3) == a.S,
                "attnkit kernel: bias must be a (B, H, T, S) view in ", acc, ", got ",
                bias.sizes());
    a.bias = bias.data_ptr();
    for (int d = 0; d < 4; ++d) a.bs[d] = bias.stride(d);
  }
  prepare(a);
  return a;
}

std::vector<Tensor> forward(const Tensor& q, const Tensor& k, const Tensor& v, double scale,
                            const std::vector<OptT>& mask, const std::vector<OptT>& scores,
                            const std::vector<int64_t>& ops, double cap, bool cap_after_bias,
                            const OptT& sinks, bool want_single) {
  Args a = common(q, k, v, scale, mask, scores, ops, cap, cap_after_bias);
  const auto acc = acc_type(q);
  Tensor out = at::empty({a.B, a.H, a.T, a.Dv}, q.options());
  Tensor lse = at::empty({a.B, a.H, a.T}, q.options().dtype(acc));
  Tensor single = at::zeros({want_single ? a.B : 0, a.H, a.T}, q.options().dtype(at::kBool));
  if (given(sinks)) {
    TORCH_CHECK(sinks->scalar_type() == acc && sinks->is_contiguous() && sinks->numel() == a.H,
                "attnkit kernel: sinks must be (H,) in ", acc);
    a.sinks = sinks->data_ptr();
  }
  a.out = out.data_ptr();
  a.lse = lse.data_ptr();
  a.single = want_single ? reinterpret_cast<uint8_t*>(single.data_ptr<bool>()) : nullptr;
  pybind11::gil_scoped_release no_gil;  // pure C++ from here: other Python threads may run
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attn_forward",
                                  [&] { forward_impl<scalar_t>(a); });
  return {out, lse, single};
}

void backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
              const Tensor& lse, const Tensor& delta, const OptT& single, double scale,
              const std::vector<OptT>& mask, const std::vector<OptT>& scores,
              const std::vector<int64_t>& ops, double cap, bool cap_after_bias, Tensor dq,
              Tensor dk, Tensor dv, const OptT& dbias) {
  Args a = common(q, k, v, scale, mask, scores, ops, cap, cap_after_bias);
  const auto acc = acc_type(q);
  check_rows(dout, "dout", q.scalar_type());
  TORCH_CHECK(dout.size(0) == a.B && dout.size(1) == a.H && dout.size(2) == a.T &&
                  dout.size(3) == a.Dv, "attnkit kernel: dout must be (B, H, T, Dv)");
  for (const Tensor* t : {&lse, &delta})
    TORCH_CHECK(t->scalar_type() == acc && t->is_contiguous() && t->dim() == 3 &&
                    t->size(0) == a.B && t->size(1) == a.H && t->size(2) == a.T,
                "attnkit kernel: lse and delta must be contiguous (B, H, T) in ", acc);
  check_rows(dq, "dq", acc);
  check_rows(dk, "dk", acc);
  check_rows(dv, "dv", acc);
  TORCH_CHECK(dq.sizes() == q.sizes() && dk.sizes() == k.sizes() && dv.sizes() == v.sizes(),
              "attnkit kernel: gradients must be shaped like q, k, v");
  a.dout = dout.data_ptr();
  strides3(dout, a.dos);
  a.lse_in = lse.data_ptr();
  a.delta = delta.data_ptr();
  if (given(single)) {
    TORCH_CHECK(single->scalar_type() == at::kBool && single->is_contiguous() &&
                    single->numel() == a.B * a.H * a.T,
                "attnkit kernel: single must be bool (B, H, T)");
    a.single_in = reinterpret_cast<const uint8_t*>(single->data_ptr<bool>());
  }
  a.dq = dq.data_ptr();
  a.dk = dk.data_ptr();
  a.dv = dv.data_ptr();
  strides3(dq, a.dqs);
  strides3(dk, a.dks);
  strides3(dv, a.dvs);
  if (given(dbias)) {
    const Tensor& db = *dbias;
    TORCH_CHECK(db.scalar_type() == acc && db.dim() == 4 && (db.size(0) == 1 || db.size(0) == a.B) &&
                    (db.size(1) == 1 || db.size(1) == a.H) && db.size(2) == a.T &&
                    (db.size(3) == 1 || db.size(3) == a.S),
                "attnkit kernel: dbias must be (B|1, H|1, T, S|1) in ", acc);
    a.dbias = db.data_ptr();
    for (int d = 0; d < 4; ++d) a.dbs[d] = db.stride(d);
    if (db.size(3) == 1) a.dbs[3] = 0;
    a.Bb = db.size(0);
    a.Hb = db.size(1);
  }
  pybind11::gil_scoped_release no_gil;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attn_backward",
                                  [&] { backward_impl<scalar_t>(a); });
}

std::string isa() {
#if defined(__AVX512BF16__)
  return "avx512bf16";
#elif defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__)
  return "avx2";
#elif defined(__x86_64__)
  return "default";
#else
  return "generic";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "attnkit's fused CPU attention kernel (forward and backward over a block plan)";
  m.def("forward", &forward);
  m.def("backward", &backward);
  m.def("isa", &isa);
  m.def("tile", []() { return std::make_pair(BQ, BK); });
}
