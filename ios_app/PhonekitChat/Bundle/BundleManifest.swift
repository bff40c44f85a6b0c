import Foundation

// manifest.json of a phonekit bundle, field for field as phonekit/schemas/bundle-1.schema.json
// declares it (schema "phonekit.bundle/1"). Keys are the schema's snake_case names, read
// through `.convertFromSnakeCase` (phonekit_version -> phonekitVersion). tests/test_apps.py
// parses this file and fails when a schema field is missing here or has the wrong type, so
// the contract cannot drift: a field the schema requires and never allows to be null is
// non-optional; every other field is Optional.

struct BundleManifest: Decodable, Sendable {
    static let schemaID = "phonekit.bundle/1"

    let schema: String
    let phonekitVersion: String
    let model: ModelInfo
    let contextLength: Int
    let quantization: Quantization
    let tokenizer: TokenizerInfo
    let artifacts: [Artifact]
    let budget: Budget?
    let eval: [String: JSONValue]?

    func artifact(_ format: String) -> Artifact? {
        artifacts.first { $0.format == format }
    }

    /// Decodes manifest.json; every failure is a `BundleError` that says what to do.
    static func decode(_ data: Data) throws -> BundleManifest {
        let decoder = JSONDecoder()
        decoder.keyDecodingStrategy = .convertFromSnakeCase
        // Check the version first: a future schema may not decode into these types at all.
        struct Header: Decodable { let schema: String? }
        guard let header = try? decoder.decode(Header.self, from: data) else {
            throw BundleError("manifest.json is not a JSON object; re-export the bundle")
        }
        guard header.schema == schemaID else {
            throw BundleError("manifest.json has schema '\(header.schema ?? "none")', this app reads '\(schemaID)'; export the bundle with a matching phonekit")
        }
        do {
            return try decoder.decode(BundleManifest.self, from: data)
        } catch let DecodingError.keyNotFound(key, context) {
            throw BundleError("manifest.json lacks \(path(context.codingPath + [key])); re-export the bundle")
        } catch let DecodingError.typeMismatch(_, context) {
            throw BundleError("manifest.json: \(path(context.codingPath)) has the wrong type; re-export the bundle")
        } catch let DecodingError.valueNotFound(_, context) {
            throw BundleError("manifest.json: \(path(context.codingPath)) is null; re-export the bundle")
        } catch {
            throw BundleError("manifest.json cannot be read (\(error.localizedDescription)); re-export the bundle")
        }
    }

    private static func path(_ keys: [CodingKey]) -> String {
        keys.map { $0.intValue.map(String.init) ?? $0.stringValue }.joined(separator: ".")
    }
}

struct ModelInfo: Decodable, Sendable {
    let id: String
    let family: String
    let params: Int
    let hubId: String?
    let license: String?
    let source: String?
    let layerSharing: Bool
    let blockApplications: Int
    let maxContext: Int
    let config: [String: JSONValue]
}

struct Quantization: Decodable, Sendable {
    let scheme: String
    let weights: String
    let weightMethod: String?
    let sourceGrid: [String: JSONValue]?
    let activations: String
    let embedding: [String: JSONValue]?
    let keptFloat: [String]
}

struct TokenizerInfo: Decodable, Sendable {
    let files: [FileEntry]
    let kind: String?
    let bosId: Int?
    let eosIds: [Int]
    let addBos: Bool
    let chatTemplate: String?
    let vocabSize: Int
}

struct Artifact: Decodable, Sendable {
    let format: String
    let file: String
    let backend: String
    let platforms: [String]
    let runtime: String
    let bytes: Int
    let sha256: String
    let files: [FileEntry]
    let details: ArtifactDetails?
}

/// The parts of an artifact's free-form `details` this app uses.
struct ArtifactDetails: Decodable, Sendable {
    /// The scheme this artifact was quantized with (a format may get a counterpart scheme).
    let quantization: Quantization?
}

struct Budget: Decodable, Sendable {
    let budgetFraction: Double?
    let allowOverBudget: Bool?
    let verdicts: [Verdict]?
}

struct Verdict: Decodable, Sendable {
    let device: String
    let format: String
    let dramBytes: Int?
    let budgetBytes: Int
    let estimateBytes: Int
    let headroomBytes: Int?
    let fits: Bool
    let fitsOsLimit: Bool?
}

struct FileEntry: Decodable, Sendable {
    let path: String
    let bytes: Int
    let sha256: String
}

/// Any JSON value: the manifest's free-form objects (model.config, quantization.embedding, eval).
enum JSONValue: Decodable, Sendable, Hashable {
    case null
    case bool(Bool)
    case number(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])

    init(from decoder: Decoder) throws {
        let container = try decoder.singleValueContainer()
        if container.decodeNil() {
            self = .null
        } else if let value = try? container.decode(Bool.self) {
            self = .bool(value)
        } else if let value = try? container.decode(Double.self) {
            self = .number(value)
        } else if let value = try? container.decode(String.self) {
            self = .string(value)
        } else if let value = try? container.decode([JSONValue].self) {
            self = .array(value)
        } else {
            self = .object(try container.decode([String: JSONValue].self))
        }
    }
}
