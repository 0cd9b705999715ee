// Generate text with a liftedge Core ML build through swift-transformers' `LanguageModel`.
//
// ARTIFACT is the folder `liftedge build MODEL --target ios -o ARTIFACT` wrote: model.mlpackage
// (stateful: inputIds, causalMask, keyCache/valueCache, logits) with tokenizer.json and
// tokenizer_config.json beside it. Package dependency: https://github.com/huggingface/swift-transformers
// (products Models, Generation, Tokenizers). Needs iOS 18 / macOS 15 (Core ML states).
//
// NOT COMPILED OR RUN: liftedge is developed on Linux, where neither Swift's Core ML nor Xcode
// exists. The calls follow swift-transformers' sources as read (LanguageModel.swift,
// Examples/transformers-cli); check them against the version you pin.

import CoreML
import Foundation
import Generation
import Models
import Tokenizers

@available(iOS 18.0, macOS 15.0, *)
func generateWithLiftedge(artifact: URL, prompt: String, maxNewTokens: Int = 64) async throws -> String {
    // Xcode compiles a bundled .mlpackage into .mlmodelc; a downloaded one is compiled once here.
    let compiled = try await MLModel.compileModel(at: artifact.appendingPathComponent("model.mlpackage"))

    // liftedge writes what a runner needs into the model's metadata (liftedge.* keys).
    let described = try MLModel(contentsOf: compiled)
    let meta = described.modelDescription.metadata[.creatorDefinedKey] as? [String: String] ?? [:]

    // Load with the compute units the memory plan assumed: on the Neural Engine (the default)
    // the 1-bit palettized weights stay compressed; other units decompress them to fp16 at
    // load and need the larger resident size in report.json ("residency").
    let units: MLComputeUnits
    switch meta["liftedge.compute_units"] {
    case "cpuAndGPU": units = .cpuAndGPU
    case "cpuOnly": units = .cpuOnly
    case "all": units = .all
    default: units = .cpuAndNeuralEngine
    }

    let tokenizer = try await AutoTokenizer.from(modelFolder: artifact)
    // keyCache/valueCache states make this a LanguageModelWithStatefulKVCache.
    let model = try LanguageModel.loadCompiled(url: compiled, computeUnits: units, tokenizer: tokenizer)

    var config = model.defaultGenerationConfig
    config.doSample = false  // greedy: what liftedge verified against the PyTorch reference
    config.maxNewTokens = maxNewTokens
    if let eos = meta["liftedge.eos_token_ids"]?.split(separator: ",").first.flatMap({ Int($0) }) {
        config.eosTokenId = eos
    }
    // The prompt goes in as one call: keep it within liftedge.max_prefill tokens (the inputIds
    // range of the package), and prompt + reply within liftedge.max_context.
    return try await model.generate(config: config, prompt: prompt)
}
