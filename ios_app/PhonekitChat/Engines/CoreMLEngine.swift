import CoreML
import Foundation
import os
import Tokenizers

/// `.mlpackage` through Core ML with the KV cache as `MLState` (iOS 18): one state per
/// reply, prompt chunks then one token per `prediction(from:using:)`. The model speaks the
/// swift-transformers LanguageModel convention that phonekit's Core ML exporter follows:
/// inputs `inputIds` [1, q] and `causalMask` [1, 1, q, past + q], output `logits`; the
/// cache position is implied by the mask's last dimension.
final class CoreMLEngine: ChatEngine, @unchecked Sendable {
    static let inputName = "inputIds"
    static let maskName = "causalMask"
    static let outputName = "logits"

    let label: String
    private let model: MLModel
    private let tokenizer: Tokenizer
    private let manifest: BundleManifest
    private let maskType: MLMultiArrayDataType?
    /// Allowed query lengths, longest first (a ranged input allows every length up to its bound).
    private let chunkLengths: [Int]
    private let stopFlag = OSAllocatedUnfairLock(initialState: false)

    private init(model: MLModel, tokenizer: Tokenizer, manifest: BundleManifest, label: String) throws {
        self.model = model
        self.tokenizer = tokenizer
        self.manifest = manifest
        self.label = label
        let inputs = model.modelDescription.inputDescriptionsByName
        guard let ids = inputs[Self.inputName]?.multiArrayConstraint else {
            throw BundleError("the Core ML model has no '\(Self.inputName)' input; re-export it with phonekit")
        }
        let unknown = Set(inputs.keys).subtracting([Self.inputName, Self.maskName])
        guard unknown.isEmpty else {
            throw BundleError("the Core ML model has inputs this app does not feed: \(unknown.sorted().joined(separator: ", "))")
        }
        guard model.modelDescription.outputDescriptionsByName[Self.outputName] != nil else {
            throw BundleError("the Core ML model has no '\(Self.outputName)' output; re-export it with phonekit")
        }
        maskType = inputs[Self.maskName]?.multiArrayConstraint?.dataType
        chunkLengths = Self.queryLengths(ids, context: manifest.contextLength)
        guard chunkLengths.contains(1) else {
            throw BundleError("the Core ML model cannot take one token at a time (query lengths \(chunkLengths)); re-export it with phonekit")
        }
    }

    static func load(_ dir: URL, _ manifest: BundleManifest, _ artifact: Artifact) async throws -> CoreMLEngine {
        let tokenizer = try BundleTokenizer.load(dir, manifest)
        let packageURL = try resolveInBundle(dir, artifact.file)
        let compiled = try await compiledModel(packageURL, identity: artifact.sha256)
        let configuration = MLModelConfiguration()
        // GPU + CPU: stateful LLMs have known Neural Engine problems (coremltools #2325, #2716).
        configuration.computeUnits = .cpuAndGPU
        let model = try await MLModel.load(contentsOf: compiled, configuration: configuration)
        return try CoreMLEngine(model: model, tokenizer: tokenizer, manifest: manifest, label: "Core ML · CPU+GPU · MLState")
    }

    /// The compiled .mlmodelc, made once per artifact (its sha256 names it) and cached.
    private static func compiledModel(_ source: URL, identity: String) async throws -> URL {
        let folder = URL.cachesDirectory.appending(path: "compiled", directoryHint: .isDirectory)
        let destination = folder.appending(path: "\(identity).mlmodelc", directoryHint: .isDirectory)
        if FileManager.default.fileExists(atPath: destination.path) { return destination }
        let temporary = try await MLModel.compileModel(at: source)
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        try FileManager.default.moveItem(at: temporary, to: destination)
        return destination
    }

    private static func queryLengths(_ constraint: MLMultiArrayConstraint, context: Int) -> [Int] {
        let shape = constraint.shapeConstraint
        switch shape.type {
        case .range:
            let range = shape.sizeRangeForDimension[1].rangeValue
            // Conservative upper bound whether `length` counts the bound or not.
            let upper = range.length >= context ? context : max(range.location + range.length - 1, 1)
            return [upper, 1]
        case .enumerated:
            return Set(shape.enumeratedShapes.map { $0[1].intValue }).sorted(by: >)
        default:
            return [constraint.shape[1].intValue]
        }
    }

    func stop() {
        stopFlag.withLock { $0 = true }
    }

    func generate(_ messages: [ChatMessage], maxNewTokens: Int, onText: @escaping @Sendable (String) -> Void) throws -> GenerationStats {
        stopFlag.withLock { $0 = false }
        let prompt = try BundleTokenizer.prompt(tokenizer, manifest, messages)
        let context = manifest.contextLength
        guard prompt.count < context else {
            throw BundleError("the conversation is \(prompt.count) tokens, the bundle's context is \(context); start a new chat")
        }
        // A fresh state per reply: the whole conversation is re-rendered every turn.
        let state = model.makeState()
        let start = Date()
        var position = 0
        var logits: MLMultiArray?
        while position < prompt.count {
            let remaining = prompt.count - position
            let length = chunkLengths.first { $0 <= remaining } ?? 1
            logits = try predict(Array(prompt[position..<position + length]), past: position, state: state)
            position += length
        }
        let prefillSeconds = Date().timeIntervalSince(start)
        guard var current = logits else {
            throw BundleError("the prompt is empty; type a message")
        }
        let eos = Set(manifest.tokenizer.eosIds)
        var generated: [Int] = []
        var shown = ""
        let decodeStart = Date()
        while generated.count < maxNewTokens, position < context, !stopFlag.withLock({ $0 }) {
            let next = argmaxOfLastRow(current)
            if eos.contains(next) { break }
            generated.append(next)
            // Decode everything so far and emit the new suffix: a token can end inside a
            // multi-byte character, which shows as U+FFFD until the next token completes it.
            let text = tokenizer.decode(tokens: generated, skipSpecialTokens: true)
            if text.hasPrefix(shown), !text.hasSuffix("\u{FFFD}") {
                onText(String(text.dropFirst(shown.count)))
                shown = text
            }
            if generated.count == maxNewTokens { break }
            current = try predict([next], past: position, state: state)
            position += 1
        }
        return GenerationStats(
            promptTokens: prompt.count,
            generatedTokens: generated.count,
            prefillTokensPerSecond: perSecond(prompt.count, prefillSeconds),
            decodeTokensPerSecond: perSecond(generated.count, Date().timeIntervalSince(decodeStart))
        )
    }

    private func predict(_ tokens: [Int], past: Int, state: MLState) throws -> MLMultiArray {
        let count = tokens.count
        let ids = try MLMultiArray(shape: [1, NSNumber(value: count)], dataType: .int32)
        ids.withUnsafeMutableBufferPointer(ofType: Int32.self) { buffer, strides in
            for (i, token) in tokens.enumerated() { buffer[i * strides[1]] = Int32(token) }
        }
        var features: [String: MLFeatureValue] = [Self.inputName: MLFeatureValue(multiArray: ids)]
        if let maskType {
            let mask = try MLMultiArray(shape: [1, 1, NSNumber(value: count), NSNumber(value: past + count)], dataType: maskType)
            if maskType == .float16 {
                fillCausalMask(mask, Float16.self, past: past)
            } else {
                fillCausalMask(mask, Float.self, past: past)
            }
            features[Self.maskName] = MLFeatureValue(multiArray: mask)
        }
        let output = try model.prediction(from: try MLDictionaryFeatureProvider(dictionary: features), using: state)
        guard let logits = output.featureValue(for: Self.outputName)?.multiArrayValue else {
            throw BundleError("the Core ML model returned no '\(Self.outputName)'")
        }
        return logits
    }
}

/// 0 where query row i may attend key column j (j <= past + i), -inf elsewhere.
private func fillCausalMask<T: BinaryFloatingPoint>(_ mask: MLMultiArray, _: T.Type, past: Int) {
    let rows = mask.shape[2].intValue
    let columns = mask.shape[3].intValue
    mask.withUnsafeMutableBufferPointer(ofType: T.self) { buffer, strides in
        for i in 0..<rows {
            for j in 0..<columns {
                buffer[i * strides[2] + j * strides[3]] = j <= past + i ? 0 : -T.infinity
            }
        }
    }
}

/// The greedy next token: argmax over the vocabulary of the last position's logits, read
/// through the array's strides (Core ML may pad rows).
private func argmaxOfLastRow(_ logits: MLMultiArray) -> Int {
    let rank = logits.shape.count
    let vocab = logits.shape[rank - 1].intValue
    var base = 0
    if rank >= 2 { base = (logits.shape[rank - 2].intValue - 1) * logits.strides[rank - 2].intValue }
    let step = logits.strides[rank - 1].intValue
    func best<T: BinaryFloatingPoint>(_ type: T.Type) -> Int {
        logits.withUnsafeBufferPointer(ofType: T.self) { buffer in
            var index = 0
            var top = -T.infinity
            for v in 0..<vocab where buffer[base + v * step] > top {
                top = buffer[base + v * step]
                index = v
            }
            return index
        }
    }
    return logits.dataType == .float16 ? best(Float16.self) : best(Float.self)
}
