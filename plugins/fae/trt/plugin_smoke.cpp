// Host-only smoke check of the plugin library (no GPU, no TensorRT runtime needed): dlopen it, call
// getCreators, create the plugin from fields, and exercise the build-side queries and serialisation.
// Built by tests/test_fae_build.py against the same TensorRT headers; exit code 0 on success.
#include <NvInferRuntime.h>
#include <dlfcn.h>

#include <cstdio>
#include <cstring>

using namespace nvinfer1;

#define CHECK(c)                                                     \
    do {                                                             \
        if (!(c)) {                                                  \
            std::fprintf(stderr, "check failed: %s (line %d)\n", #c, __LINE__); \
            return 1;                                                \
        }                                                            \
    } while (0)

int main(int argc, char** argv) {
    CHECK(argc == 2);
    void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) std::fprintf(stderr, "%s\n", dlerror());
    CHECK(lib != nullptr);
    using GetCreators = IPluginCreatorInterface* const* (*)(int32_t&);
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(lib, "getCreators"));
    CHECK(getCreators != nullptr && dlsym(lib, "setLoggerFinder") != nullptr);
    int32_t n = 0;
    IPluginCreatorInterface* const* creators = getCreators(n);
    CHECK(n == 1 && creators != nullptr);
    CHECK(std::strcmp(creators[0]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0);
    auto* creator = static_cast<IPluginCreatorV3One*>(creators[0]);
    CHECK(std::strcmp(creator->getPluginName(), "FlashAttentionEntropy") == 0);
    CHECK(std::strcmp(creator->getPluginVersion(), "1") == 0);
    CHECK(std::strcmp(creator->getPluginNamespace(), "toprovar") == 0);
    PluginFieldCollection const* names = creator->getFieldNames();
    CHECK(names->nbFields == 2);

    float scale = 0.125f;
    int32_t headMean = 1;
    PluginField fields[2] = {PluginField("scale", &scale, PluginFieldType::kFLOAT32, 1),
                             PluginField("head_mean", &headMean, PluginFieldType::kINT32, 1)};
    PluginFieldCollection fc{2, fields};
    IPluginV3* plugin = creator->createPlugin("fae", &fc, TensorRTPhase::kBUILD);
    CHECK(plugin != nullptr);
    auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* rt = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    CHECK(core && build && rt);
    CHECK(std::strcmp(core->getPluginName(), "FlashAttentionEntropy") == 0);
    CHECK(build->getNbOutputs() == 2);

    DataType in[4] = {DataType::kBF16, DataType::kBF16, DataType::kBF16, DataType::kINT32};
    DataType out[2];
    CHECK(build->getOutputDataTypes(out, 2, in, 4) == 0);
    CHECK(out[0] == DataType::kBF16 && out[1] == DataType::kFLOAT);

    DynamicPluginTensorDesc d[6]{};
    DataType const types[6] = {DataType::kHALF, DataType::kHALF, DataType::kHALF, DataType::kINT32, DataType::kHALF,
                               DataType::kFLOAT};
    for (int i = 0; i < 6; ++i) {
        d[i].desc.type = types[i];
        d[i].desc.format = TensorFormat::kLINEAR;
    }
    for (int pos = 0; pos < 6; ++pos) CHECK(build->supportsFormatCombination(pos, d, 4, 2));
    d[1].desc.type = DataType::kBF16;  // k must match q
    CHECK(!build->supportsFormatCombination(1, d, 4, 2));
    d[1].desc.type = DataType::kHALF;
    d[0].desc.type = DataType::kFLOAT;  // fp32 q is not supported
    CHECK(!build->supportsFormatCombination(0, d, 4, 2));
    d[0].desc.type = DataType::kHALF;

    d[0].max = Dims{4, {2, 16, 4096, 128}};
    CHECK(build->getWorkspaceSize(d, 4, d + 4, 2) >= size_t(2) * 16 * 4096 * 4);

    PluginFieldCollection const* ser = rt->getFieldsToSerialize();
    CHECK(ser->nbFields == 2);
    IPluginV3* again = creator->createPlugin("fae", ser, TensorRTPhase::kRUNTIME);
    CHECK(again != nullptr);
    auto* rt2 = static_cast<IPluginV3OneRuntime*>(again->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    PluginFieldCollection const* ser2 = rt2->getFieldsToSerialize();
    CHECK(*static_cast<float const*>(ser2->fields[0].data) == 0.125f);
    CHECK(*static_cast<int32_t const*>(ser2->fields[1].data) == 1);
    IPluginV3* clone = plugin->clone();
    CHECK(clone != nullptr);
    delete clone;
    delete again;
    delete plugin;
    std::printf("plugin smoke ok\n");
    return 0;
}
