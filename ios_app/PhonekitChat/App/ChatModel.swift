import Foundation
import Observation

/// The app's state: pick a bundle, check it against this phone, verify, load, chat.
@MainActor
@Observable
final class ChatModel {
    enum Phase { case browsing, details, verifying, loading, chat }

    static let maxNewTokens = 256

    var phase: Phase = .browsing
    var bundles: [LocalBundle] = []
    var selected: LocalBundle?
    var format: String?
    var budget: BudgetCheck?
    /// Set while the user must confirm loading a bundle that is over its budget.
    var confirmOverBudget = false
    var verifyProgress = 0.0
    var error: String?
    var engineLabel: String?
    var templateNote: String?
    var messages: [ChatMessage] = []
    var streaming = ""
    var generating = false
    var liveTokensPerSecond: Double?
    var lastStats: GenerationStats?

    private var engine: ChatEngine?
    private var generation: Task<Void, Never>?

    func refresh() {
        bundles = BundleStore.list()
    }

    func importFolder(_ url: URL) {
        do {
            _ = try BundleStore.importFolder(url)
            refresh()
        } catch {
            self.error = error.localizedDescription
        }
    }

    func select(_ bundle: LocalBundle) {
        guard let manifest = bundle.manifest else { return }
        selected = bundle
        error = nil
        phase = .details
        if let format = ChatEngines.formats.first(where: { manifest.artifact($0) != nil }) {
            selectFormat(format)
        } else {
            format = nil
            budget = nil
        }
    }

    func selectFormat(_ format: String) {
        guard let manifest = selected?.manifest, let artifact = manifest.artifact(format) else { return }
        self.format = format
        budget = checkBudget(manifest, artifact, DeviceMemory.read())
        error = nil
    }

    /// Verifies the sha256s, then loads; an over-budget bundle needs `force` (the user's yes).
    func load(force: Bool = false) {
        guard let bundle = selected, let manifest = bundle.manifest, let format,
              let artifact = manifest.artifact(format), let budget else { return }
        switch budget.fit {
        case .overAvailable:
            error = "Refused: iOS lets this app allocate \(megabytes(budget.memory.availableBytes)) more, the bundle needs about \(megabytes(budget.estimateBytes)). Export a smaller bundle (stronger --quant or shorter --context)."
            return
        case .overBudget where !force:
            confirmOverBudget = true
            return
        default:
            break
        }
        confirmOverBudget = false
        error = nil
        verifyProgress = 0
        phase = .verifying
        Task {
            do {
                let (progress, reporter) = AsyncStream<Double>.makeStream()
                let verification = Task.detached {
                    defer { reporter.finish() }
                    var shown = 0.0
                    try verifyBundle(at: bundle.url, manifest: manifest, artifact: artifact) { fraction in
                        // Report whole percents only: hashing a large model calls this thousands of times.
                        if fraction - shown >= 0.01 || fraction >= 1 {
                            shown = fraction
                            reporter.yield(fraction)
                        }
                    }
                }
                for await fraction in progress { verifyProgress = fraction }
                try await verification.value
                phase = .loading
                // Loading maps hundreds of MB and (Core ML) compiles: keep it off the main actor.
                let opened = try await Task.detached { try await ChatEngines.open(bundle.url, manifest, artifact) }.value
                engine = opened
                engineLabel = opened.label
                templateNote = note(manifest, opened)
                messages = []
                lastStats = nil
                phase = .chat
            } catch {
                self.error = error.localizedDescription
                phase = .details
            }
        }
    }

    private func note(_ manifest: BundleManifest, _ engine: ChatEngine) -> String? {
        if manifest.tokenizer.chatTemplate == nil {
            return "No chat template in this bundle (a base model): your text is continued as is."
        }
        if let pte = engine as? ExecuTorchEngine, pte.ignoresTemplate {
            return "This bundle's tokenizer is tokenizer.model only, so its chat template is not applied."
        }
        return nil
    }

    func send(_ text: String) {
        let trimmed = text.trimmingCharacters(in: .whitespacesAndNewlines)
        guard let engine, !trimmed.isEmpty, !generating else { return }
        messages.append(ChatMessage(role: "user", content: trimmed))
        let conversation = messages
        streaming = ""
        generating = true
        liveTokensPerSecond = nil
        error = nil
        let limit = Self.maxNewTokens
        let (pieces, sink) = AsyncStream<String>.makeStream()
        let worker = Task.detached { () -> Result<GenerationStats, Error> in
            defer { sink.finish() }
            return Result { try engine.generate(conversation, maxNewTokens: limit) { sink.yield($0) } }
        }
        generation = Task {
            var count = 0
            var first: Date?
            for await piece in pieces {
                streaming += piece
                count += 1
                let now = Date()
                if let first, now > first {
                    // Live decode rate: pieces after the first over the time since the first.
                    liveTokensPerSecond = Double(count - 1) / now.timeIntervalSince(first)
                } else {
                    first = now
                }
            }
            let outcome = await worker.value
            switch outcome {
            case .success(let stats):
                lastStats = stats
                messages.append(ChatMessage(role: "assistant", content: streaming))
            case .failure(let failure):
                error = "Generation failed: \(failure.localizedDescription)"
            }
            streaming = ""
            generating = false
        }
    }

    func stop() {
        engine?.stop()
    }

    /// Back to the bundle list; the engine is released after a running generation returned.
    func unload() {
        engine?.stop()
        let running = generation
        Task {
            await running?.value
            engine = nil
            messages = []
            selected = nil
            budget = nil
            phase = .browsing
            refresh()
        }
    }

    func back() {
        selected = nil
        budget = nil
        error = nil
        phase = .browsing
    }
}
