import ExecuTorchLLM
import Foundation
import os
import Tokenizers

/// `.pte` through ExecuTorch's iOS LLM runner (`TextRunner`, the Swift face of the C++
/// TextLLMRunner that phonekit's ExecuTorch tests drive) with the bundle's tokenizer file.
/// The runner takes text; when the bundle has a chat template, swift-transformers renders it
/// and the rendered text (special tokens included) is what the runner tokenizes.
final class ExecuTorchEngine: ChatEngine, @unchecked Sendable {
    let label: String
    private let runner: TextRunner
    private let manifest: BundleManifest
    /// Renders the chat template; nil for base models (no template) and tokenizer.model bundles.
    private let templater: Tokenizer?
    private let stopFlag = OSAllocatedUnfairLock(initialState: false)

    init(_ dir: URL, _ manifest: BundleManifest, _ artifact: Artifact) throws {
        let names = Set(manifest.tokenizer.files.map(\.path))
        guard let tokenizerName = ["tokenizer.json", "tokenizer.model"].first(where: names.contains) else {
            throw BundleError("the bundle has no tokenizer (exported from random weights); it cannot chat")
        }
        let runner = TextRunner(
            modelPath: try resolveInBundle(dir, artifact.file).path,
            tokenizerPath: try resolveInBundle(dir, tokenizerName).path)
        try runner.load()
        self.runner = runner
        self.manifest = manifest
        let canRender = manifest.tokenizer.chatTemplate != nil && names.contains("tokenizer.json")
        templater = try canRender ? BundleTokenizer.load(dir, manifest) : nil
        label = "ExecuTorch \(artifact.runtime.split(separator: " ").last ?? "") · \(artifact.backend)"
    }

    /// Set when the bundle has a template this engine cannot render (tokenizer.model only).
    var ignoresTemplate: Bool { manifest.tokenizer.chatTemplate != nil && templater == nil }

    func stop() {
        stopFlag.withLock { $0 = true }
        runner.stop()
    }

    func generate(_ messages: [ChatMessage], maxNewTokens: Int, onText: @escaping @Sendable (String) -> Void) throws -> GenerationStats {
        stopFlag.withLock { $0 = false }
        let (prompt, promptTokens, bosInText) = try promptText(messages)
        // The runner prepends BOS only when asked; the manifest says whether the model wants one.
        let bosCount = manifest.tokenizer.addBos && manifest.tokenizer.bosId != nil && !bosInText ? 1 : 0
        // Each turn re-renders the whole conversation, so the cache starts empty every time.
        runner.reset()
        let start = Date()
        let firstToken = OSAllocatedUnfairLock<Date?>(initialState: nil)
        let pieces = OSAllocatedUnfairLock(initialState: 0)
        try runner.generate(prompt, ExecuTorchLLM.Config {
            $0.echoEnabled = false
            $0.maximumNewTokens = maxNewTokens
            $0.sequenceLength = manifest.contextLength
            $0.temperature = 0
            $0.bosCount = bosCount
        }) { [stopFlag] token in
            if stopFlag.withLock({ $0 }) { return }
            firstToken.withLock { if $0 == nil { $0 = Date() } }
            pieces.withLock { $0 += 1 }
            onText(token)
        }
        let end = Date()
        let first = firstToken.withLock { $0 } ?? end
        let count = pieces.withLock { $0 }
        return GenerationStats(
            promptTokens: promptTokens,
            generatedTokens: count,
            // The runner reports no statistics here: prefill is timed up to the first token.
            prefillTokensPerSecond: promptTokens.map { perSecond($0, first.timeIntervalSince(start)) },
            decodeTokensPerSecond: perSecond(count - 1, end.timeIntervalSince(first))
        )
    }

    /// The text the runner tokenizes, its token count when known, and whether it starts with BOS.
    private func promptText(_ messages: [ChatMessage]) throws -> (String, Int?, Bool) {
        guard let templater else {
            return (messages.map(\.content).joined(separator: "\n"), nil, false)
        }
        let ids = try BundleTokenizer.rendered(templater, manifest, messages)
        let bosInText = manifest.tokenizer.bosId.map { ids.first == $0 } ?? false
        return (templater.decode(tokens: ids, skipSpecialTokens: false), ids.count, bosInText)
    }
}
