// TensorRT IPluginV3 shell over the Flash Attention Entropy kernel. All the work is fae_forward()
// (plugins/fae/fae.h); enqueue only fills its parameters and launches on TensorRT's stream.
#include "fae_plugin.h"

#include "fae.h"

#include <cxxabi.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <typeinfo>

using namespace nvinfer1;

namespace toprovar {
namespace {

constexpr char const* kName = "FlashAttentionEntropy";
constexpr char const* kVersion = "1";
constexpr char const* kNamespace = "toprovar";

}  // namespace

namespace {

// True when the dynamic type of *obj is or derives from the class named `base` (mangled; RTTI names compare
// across libraries). Reads only the object's RTTI, whose place (vtable[-1]) the Itanium C++ ABI fixes, so it is
// safe on an object whose virtual functions are laid out differently from our headers' view of it.
bool derivesFrom(std::type_info const& t, char const* base) noexcept {
    char const* name = t.name();
    if (std::strcmp(name + (name[0] == '*'), base + (base[0] == '*')) == 0) return true;
    if (auto const* si = dynamic_cast<abi::__si_class_type_info const*>(&t)) return derivesFrom(*si->__base_type, base);
    if (auto const* vmi = dynamic_cast<abi::__vmi_class_type_info const*>(&t)) {
        for (unsigned i = 0; i < vmi->__base_count; ++i)
            if (derivesFrom(*vmi->__base_info[i].__base_type, base)) return true;
    }
    return false;
}

template <typename T>
bool sameInterface(T* obj) noexcept {
    return obj != nullptr && derivesFrom(typeid(*obj), typeid(T).name());
}

// Set by setLoggerFinder when TensorRT loads the library. The logger is looked up at each message, from the
// thread of the plugin method that logs (ILoggerFinder::findLogger: the logger of the builder, engine or context
// that called it), never cached: a cached logger would be another builder's or one already freed.
// ILogger and ILoggerFinder changed their virtual layout in TensorRT 11 (both became IVersionedInterface, in
// namespace v_1_0; TensorRT-RTX 1.7 has the TensorRT 11 layout): a library built with other headers than its
// host's must not call them, so each object's RTTI is checked first and the message goes to stderr otherwise.
ILoggerFinder* gLoggerFinder = nullptr;

void logError(char const* msg) noexcept {
    if (sameInterface(gLoggerFinder)) {
        ILogger* const logger = gLoggerFinder->findLogger();
        if (sameInterface(logger)) {
            logger->log(ILogger::Severity::kERROR, msg);
            return;
        }
    }
    std::fprintf(stderr, "[toprovar FAE plugin] %s\n", msg);
}

bool isAttnType(DataType t) { return t == DataType::kHALF || t == DataType::kBF16; }

}  // namespace

FaePlugin::FaePlugin(float scale, int32_t headMean) : mScale(scale), mHeadMean(headMean != 0 ? 1 : 0) {
    mFields.emplace_back("scale", &mScale, PluginFieldType::kFLOAT32, 1);
    mFields.emplace_back("head_mean", &mHeadMean, PluginFieldType::kINT32, 1);
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
}

IPluginCapability* FaePlugin::getCapabilityInterface(PluginCapabilityType type) noexcept {
    switch (type) {
        case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
        case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
        case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

IPluginV3* FaePlugin::clone() noexcept {
    try {
        return new FaePlugin(mScale, mHeadMean);
    } catch (std::exception const&) {
        return nullptr;
    }
}

char const* FaePlugin::getPluginName() const noexcept { return kName; }
char const* FaePlugin::getPluginVersion() const noexcept { return kVersion; }
char const* FaePlugin::getPluginNamespace() const noexcept { return kNamespace; }

int32_t FaePlugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                                      int32_t nbInputs) const noexcept {
    if (nbOutputs != 2 || nbInputs < 3) return -1;
    if (!isAttnType(inputTypes[0])) {
        // TensorRT networks are strongly typed: a float32 export gives float32 q/k/v, which no kernel serves.
        logError("FlashAttentionEntropy: q, k, v must be float16 or bfloat16 (export the pieces with --dtype "
                 "bfloat16 or float16)");
        return -1;
    }
    outputTypes[0] = inputTypes[0];
    outputTypes[1] = DataType::kFLOAT;
    return 0;
}

int32_t FaePlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
                                   int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs,
                                   IExprBuilder& exprBuilder) noexcept {
    if (nbInputs < 3 || nbInputs > 4 || nbOutputs != 2 || inputs[0].nbDims != 4) return -1;
    // O: (B, H, Nq, d_v), the token count Nq stays symbolic.
    outputs[0].nbDims = 4;
    outputs[0].d[0] = inputs[0].d[0];
    outputs[0].d[1] = inputs[0].d[1];
    outputs[0].d[2] = inputs[0].d[2];
    outputs[0].d[3] = inputs[2].d[3];
    // H: (B, H, Nq) float32, or (B, Nq) averaged over heads.
    if (mHeadMean) {
        outputs[1].nbDims = 2;
        outputs[1].d[0] = inputs[0].d[0];
        outputs[1].d[1] = inputs[0].d[2];
    } else {
        outputs[1].nbDims = 3;
        outputs[1].d[0] = inputs[0].d[0];
        outputs[1].d[1] = inputs[0].d[1];
        outputs[1].d[2] = inputs[0].d[2];
    }
    (void) exprBuilder;
    return 0;
}

bool FaePlugin::supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                          int32_t nbOutputs) noexcept {
    if (nbInputs < 3 || nbInputs > 4 || nbOutputs != 2 || pos < 0 || pos >= nbInputs + nbOutputs) return false;
    PluginTensorDesc const& d = inOut[pos].desc;
    if (d.format != TensorFormat::kLINEAR) return false;
    if (pos == 0) return isAttnType(d.type);
    DataType const qType = inOut[0].desc.type;
    if (pos == 1 || pos == 2) return d.type == qType;          // k, v
    if (pos == 3 && nbInputs == 4) return d.type == DataType::kINT32;  // key_lengths
    if (pos == nbInputs) return d.type == qType;               // O
    return d.type == DataType::kFLOAT;                         // H
}

int32_t FaePlugin::configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs,
                                   DynamicPluginTensorDesc const* /*out*/, int32_t /*nbOutputs*/) noexcept {
    if (nbInputs < 3 || in[0].desc.dims.nbDims != 4) return -1;
    int64_t const d = in[0].desc.dims.d[3];
    if (d != -1 && d != 64 && d != 128) {
        logError("FlashAttentionEntropy: head dim must be 64 or 128");
        return -1;
    }
    return 0;
}

size_t FaePlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t /*nbInputs*/,
                                   DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept {
    if (!mHeadMean) return 0;
    Dims const& q = inputs[0].max;  // per-head entropies before the head mean, from the profile's max
    return static_cast<size_t>(q.d[0]) * static_cast<size_t>(q.d[1]) * static_cast<size_t>(q.d[2]) * sizeof(float) +
           256;
}

int32_t FaePlugin::onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* /*out*/,
                                 int32_t /*nbOutputs*/) noexcept {
    if (nbInputs < 3 || nbInputs > 4 || in[0].dims.nbDims != 4) return -1;
    mNbInputs = nbInputs;
    return (in[0].dims.d[3] == 64 || in[0].dims.d[3] == 128) ? 0 : -1;
}

int32_t FaePlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
                           void const* const* inputs, void* const* outputs, void* workspace,
                           cudaStream_t stream) noexcept {
    Dims const& q = inputDesc[0].dims;
    Dims const& k = inputDesc[1].dims;
    FaeParams p{};
    p.q = inputs[0];
    p.k = inputs[1];
    p.v = inputs[2];
    p.key_lengths = mNbInputs == 4 ? static_cast<int32_t const*>(inputs[3]) : nullptr;
    p.o = outputs[0];
    p.h = static_cast<float*>(outputs[1]);
    p.batch = static_cast<int32_t>(q.d[0]);
    p.heads = static_cast<int32_t>(q.d[1]);
    p.nq = static_cast<int32_t>(q.d[2]);
    p.head_dim = static_cast<int32_t>(q.d[3]);
    p.nk = static_cast<int32_t>(k.d[2]);
    p.scale = mScale > 0.f ? mScale : 1.f / std::sqrt(static_cast<float>(p.head_dim));
    p.head_mean = mHeadMean;
    p.dtype = inputDesc[0].type == DataType::kBF16 ? FAE_DTYPE_BF16 : FAE_DTYPE_FP16;
    fae_set_contiguous_strides(&p);
    if (mHeadMean) {
        // TensorRT's workspace is 256-byte aligned; the size came from getWorkspaceSize (profile max).
        p.workspace = workspace;
        p.workspace_bytes = fae_workspace_size(&p);
    }
    int const status = fae_forward(&p, stream);
    if (status != FAE_OK) {
        logError(fae_status_string(status));
        return -1;
    }
    return 0;
}

IPluginV3* FaePlugin::attachToContext(IPluginResourceContext* /*context*/) noexcept { return clone(); }

PluginFieldCollection const* FaePlugin::getFieldsToSerialize() noexcept {
    mFields.clear();
    mFields.emplace_back("scale", &mScale, PluginFieldType::kFLOAT32, 1);
    mFields.emplace_back("head_mean", &mHeadMean, PluginFieldType::kINT32, 1);
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
    return &mFieldCollection;
}

FaePluginCreator::FaePluginCreator() {
    mFields.emplace_back("scale", nullptr, PluginFieldType::kFLOAT32, 1);
    mFields.emplace_back("head_mean", nullptr, PluginFieldType::kINT32, 1);
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
}

char const* FaePluginCreator::getPluginName() const noexcept { return kName; }
char const* FaePluginCreator::getPluginVersion() const noexcept { return kVersion; }
char const* FaePluginCreator::getPluginNamespace() const noexcept { return kNamespace; }
PluginFieldCollection const* FaePluginCreator::getFieldNames() noexcept { return &mFieldCollection; }

IPluginV3* FaePluginCreator::createPlugin(char const* /*name*/, PluginFieldCollection const* fc,
                                          TensorRTPhase /*phase*/) noexcept {
    try {
        float scale = 0.f;  // <= 0: 1/sqrt(d) at enqueue
        int32_t headMean = 0;
        for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i) {
            PluginField const& f = fc->fields[i];
            if (f.name == nullptr || f.data == nullptr || f.length < 1) continue;
            if (std::strcmp(f.name, "scale") == 0) {
                if (f.type == PluginFieldType::kFLOAT32)
                    scale = *static_cast<float const*>(f.data);
                else if (f.type == PluginFieldType::kFLOAT64)
                    scale = static_cast<float>(*static_cast<double const*>(f.data));
            } else if (std::strcmp(f.name, "head_mean") == 0) {
                if (f.type == PluginFieldType::kINT32)
                    headMean = *static_cast<int32_t const*>(f.data);
                else if (f.type == PluginFieldType::kINT64)
                    headMean = static_cast<int32_t>(*static_cast<int64_t const*>(f.data));
            }
        }
        return new FaePlugin(scale, headMean);
    } catch (std::exception const&) {
        return nullptr;
    }
}

}  // namespace toprovar

// Plugin-library entry points: trt.get_plugin_registry().load_library(), IPluginRegistry::loadLibrary,
// trtexec --dynamicPlugins.
extern "C" {

__attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder* finder) {
    toprovar::gLoggerFinder = finder;
}

__attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
    static toprovar::FaePluginCreator creator;
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&creator};
    nbCreators = 1;
    return creators;
}

}  // extern "C"
