import Foundation
import Hub
import Tokenizers

struct ChatMessage: Identifiable, Sendable {
    let id = UUID()
    let role: String
    var content: String
}

struct GenerationStats: Sendable {
    let promptTokens: Int?
    let generatedTokens: Int
    let prefillTokensPerSecond: Double?
    let decodeTokensPerSecond: Double
}

/// One runtime driving one artifact. `generate` blocks its (background) caller.
protocol ChatEngine: AnyObject, Sendable {
    var label: String { get }
    func generate(_ messages: [ChatMessage], maxNewTokens: Int, onText: @escaping @Sendable (String) -> Void) throws -> GenerationStats
    /// Asks a running `generate` to return early; safe from any thread.
    func stop()
}

enum ChatEngines {
    /// The formats this app runs, in the order it prefers them.
    static let formats = ["coreml", "pte"]

    static func open(_ dir: URL, _ manifest: BundleManifest, _ artifact: Artifact) async throws -> ChatEngine {
        switch artifact.format {
        case "coreml":
            return try await CoreMLEngine.load(dir, manifest, artifact)
        case "pte":
            return try ExecuTorchEngine(dir, manifest, artifact)
        default:
            let other = formats.first { manifest.artifact($0) != nil }
            throw BundleError("this app runs Core ML and ExecuTorch artifacts, not '\(artifact.format)'; "
                + (other.map { "pick the \($0) artifact" } ?? "re-export with phonekit export --target ios"))
        }
    }
}

func perSecond(_ count: Int, _ seconds: Double) -> Double {
    seconds > 0 && count > 0 ? Double(count) / seconds : 0
}

/// swift-transformers' tokenizer for the bundle's tokenizer.json. The bundle has no
/// tokenizer_config.json, so its config is built from the manifest: the chat template, and
/// no "clean up tokenization spaces", so decoding gives back exactly the text the template
/// rendered (the ExecuTorch path feeds that text to the runner).
enum BundleTokenizer {
    static func load(_ dir: URL, _ manifest: BundleManifest) throws -> Tokenizer {
        guard manifest.tokenizer.files.contains(where: { $0.path == "tokenizer.json" }) else {
            throw BundleError("the bundle has no tokenizer.json (swift-transformers cannot read tokenizer.model alone); use its .pte artifact")
        }
        let data = try Data(contentsOf: try resolveInBundle(dir, "tokenizer.json"))
        guard let tokenizerData = try JSONSerialization.jsonObject(with: data) as? [NSString: Any] else {
            throw BundleError("tokenizer.json is not a JSON object; re-export the bundle")
        }
        let modelType = (tokenizerData["model"] as? [String: Any])?["type"] as? String
        guard modelType == "BPE" else {
            throw BundleError("tokenizer.json uses a \(modelType ?? "unknown") model; this app reads BPE tokenizers; use the .pte artifact")
        }
        var config: [NSString: Any] = ["tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": false]
        if let template = manifest.tokenizer.chatTemplate { config["chat_template"] = template }
        if let bos = manifest.tokenizer.bosId, let text = tokenText(bos, tokenizerData) { config["bos_token"] = text }
        if let eos = manifest.tokenizer.eosIds.first, let text = tokenText(eos, tokenizerData) { config["eos_token"] = text }
        return try AutoTokenizer.from(tokenizerConfig: Config(config), tokenizerData: Config(tokenizerData))
    }

    /// The prompt as token ids: the chat template when the bundle has one, else the user's
    /// text continued as is (base models), with BOS when the manifest asks for it.
    static func prompt(_ tokenizer: Tokenizer, _ manifest: BundleManifest, _ messages: [ChatMessage]) throws -> [Int] {
        var ids = try rendered(tokenizer, manifest, messages)
        if manifest.tokenizer.addBos, let bos = manifest.tokenizer.bosId, ids.first != bos {
            ids.insert(bos, at: 0)
        }
        return ids
    }

    /// The conversation rendered by the bundle's chat template (or joined as plain text), without BOS.
    static func rendered(_ tokenizer: Tokenizer, _ manifest: BundleManifest, _ messages: [ChatMessage]) throws -> [Int] {
        guard let template = manifest.tokenizer.chatTemplate else {
            return tokenizer.encode(text: messages.map(\.content).joined(separator: "\n"), addSpecialTokens: false)
        }
        let turns: [Message] = messages.map { ["role": $0.role, "content": $0.content] }
        return try tokenizer.applyChatTemplate(
            messages: turns, chatTemplate: .literal(template), addGenerationPrompt: true,
            truncation: false, maxLength: nil, tools: nil)
    }

    private static func tokenText(_ id: Int, _ data: [NSString: Any]) -> String? {
        let added = data["added_tokens"] as? [[String: Any]] ?? []
        if let token = added.first(where: { ($0["id"] as? Int) == id }) { return token["content"] as? String }
        let vocab = (data["model"] as? [String: Any])?["vocab"] as? [String: Int] ?? [:]
        return vocab.first { $0.value == id }?.key
    }
}
