// WinogradStub: the output of a pruned "same"-padded conv (N, K, ceil(H / stride), ceil(W / stride)), all zeros,
// the activation folded in. Inputs: x (N, C, H, W) and the conv's weight (K, C/groups, k, k), which gives K;
// attribute: stride. See CMakeLists.txt for why it exists.
#include <cstring>

#include <openvino/core/extension.hpp>
#include <openvino/core/op_extension.hpp>
#include <openvino/frontend/onnx/extension/op.hpp>
#include <openvino/op/op.hpp>

class WinogradStub : public ov::op::Op {
 public:
  OPENVINO_OP("WinogradStub", "winoprune");

  WinogradStub() = default;
  explicit WinogradStub(const ov::OutputVector& args) : Op(args) { constructor_validate_and_infer_types(); }

  void validate_and_infer_types() override {
    ov::PartialShape out = get_input_partial_shape(0);
    const ov::PartialShape& w = get_input_partial_shape(1);
    if (out.rank().is_static() && w.rank().is_static()) {
      out[1] = w[0];
      for (int d = 2; d < 4; ++d)
        if (out[d].is_static()) out[d] = (out[d].get_length() - 1) / m_stride + 1;
    }
    set_output_type(0, get_input_element_type(0), out);
  }

  std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& args) const override {
    auto copy = std::make_shared<WinogradStub>();
    copy->m_stride = m_stride;
    copy->set_arguments(args);
    copy->validate_and_infer_types();
    return copy;
  }

  bool visit_attributes(ov::AttributeVisitor& visitor) override {
    visitor.on_attribute("stride", m_stride);
    return true;
  }
  bool has_evaluate() const override { return true; }

  bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override {
    ov::Shape shape = inputs[0].get_shape();
    shape[1] = inputs[1].get_shape()[0];
    shape[2] = (shape[2] - 1) / m_stride + 1;
    shape[3] = (shape[3] - 1) / m_stride + 1;
    outputs[0].set_shape(shape);
    std::memset(outputs[0].data(), 0, outputs[0].get_byte_size());
    return true;
  }

 private:
  int64_t m_stride = 1;
};

OPENVINO_CREATE_EXTENSIONS(std::vector<ov::Extension::Ptr>(
    {std::make_shared<ov::OpExtension<WinogradStub>>(),
     std::make_shared<ov::frontend::onnx::OpExtension<WinogradStub>>(
         "WinogradStub", "winoprune", std::map<std::string, std::string>{{"stride", "stride"}})}));
