import CryptoKit
import Foundation

/// A one-line problem with a bundle, shown to the user as is.
struct BundleError: LocalizedError {
    let message: String
    init(_ message: String) { self.message = message }
    var errorDescription: String? { message }
}

/// A bundle folder on this phone with its parsed manifest (or why it cannot be read).
struct LocalBundle: Identifiable, Sendable {
    let url: URL
    let manifest: BundleManifest?
    let problem: String?
    var id: URL { url }
    var name: String { url.lastPathComponent }
}

/// Bundles live in Documents/NAME: where Finder's file sharing, the Files app, the in-app
/// importer and `phonekit push ios` put them.
enum BundleStore {
    static var root: URL { URL.documentsDirectory }

    static func list() -> [LocalBundle] {
        let folders = (try? FileManager.default.contentsOfDirectory(
            at: root, includingPropertiesForKeys: [.isDirectoryKey], options: [.skipsHiddenFiles])) ?? []
        return folders
            .filter { (try? $0.resourceValues(forKeys: [.isDirectoryKey]).isDirectory) == true }
            .sorted { $0.lastPathComponent < $1.lastPathComponent }
            .map(read)
    }

    static func read(_ url: URL) -> LocalBundle {
        let file = url.appending(path: "manifest.json")
        guard let data = try? Data(contentsOf: file) else {
            return LocalBundle(url: url, manifest: nil, problem: "no manifest.json in \(url.lastPathComponent); copy a folder written by phonekit export")
        }
        do {
            return LocalBundle(url: url, manifest: try BundleManifest.decode(data), problem: nil)
        } catch {
            return LocalBundle(url: url, manifest: nil, problem: error.localizedDescription)
        }
    }

    /// Copies a folder picked in the Files app into Documents (the pick is only lent to us).
    static func importFolder(_ source: URL) throws -> URL {
        let scoped = source.startAccessingSecurityScopedResource()
        defer { if scoped { source.stopAccessingSecurityScopedResource() } }
        guard FileManager.default.fileExists(atPath: source.appending(path: "manifest.json").path) else {
            throw BundleError("\(source.lastPathComponent) has no manifest.json; pick a folder written by phonekit export")
        }
        let destination = root.appending(path: source.lastPathComponent, directoryHint: .isDirectory)
        if FileManager.default.fileExists(atPath: destination.path) {
            try FileManager.default.removeItem(at: destination)
        }
        try FileManager.default.copyItem(at: source, to: destination)
        return destination
    }
}

/// The files an artifact needs: the tokenizer's files and the artifact's own (manifest order).
func filesToVerify(_ manifest: BundleManifest, _ artifact: Artifact) -> [FileEntry] {
    manifest.tokenizer.files + artifact.files
}

/// Checks the size and sha256 of every file `artifact` needs before anything is loaded, as
/// `phonekit run` does on a computer: a truncated copy or a swapped file must never reach the
/// runtime. Reports the fraction hashed so far.
func verifyBundle(at dir: URL, manifest: BundleManifest, artifact: Artifact, progress: (Double) -> Void) throws {
    let entries = filesToVerify(manifest, artifact)
    let total = max(entries.reduce(0) { $0 + $1.bytes }, 1)
    var done = 0
    for entry in entries {
        let url = try resolveInBundle(dir, entry.path)
        guard let size = (try? FileManager.default.attributesOfItem(atPath: url.path))?[.size] as? Int else {
            throw BundleError("\(entry.path) is listed in manifest.json but missing; copy the whole bundle again")
        }
        guard size == entry.bytes else {
            throw BundleError("\(entry.path) has \(size) bytes, manifest.json says \(entry.bytes); the copy is incomplete, copy it again")
        }
        let handle = try FileHandle(forReadingFrom: url)
        defer { try? handle.close() }
        var hasher = SHA256()
        while let chunk = try handle.read(upToCount: 1 << 20), !chunk.isEmpty {
            try Task.checkCancellation()
            hasher.update(data: chunk)
            done += chunk.count
            progress(Double(done) / Double(total))
        }
        guard hex(hasher.finalize()) == entry.sha256 else {
            throw BundleError("\(entry.path): sha256 does not match manifest.json; the file was modified or corrupted, copy the bundle again")
        }
    }
}

/// Lowercase hex, the form phonekit writes into manifest.json.
func hex<Bytes: Sequence>(_ bytes: Bytes) -> String where Bytes.Element == UInt8 {
    bytes.map { String(format: "%02x", $0) }.joined()
}

/// A manifest path inside `dir`; a path that would leave the bundle folder is refused.
func resolveInBundle(_ dir: URL, _ path: String) throws -> URL {
    let parts = path.split(separator: "/", omittingEmptySubsequences: false)
    guard !path.hasPrefix("/"), !parts.contains(where: { $0 == ".." || $0.isEmpty }) else {
        throw BundleError("manifest.json lists the path '\(path)', which leaves the bundle folder; re-export the bundle")
    }
    return dir.appending(path: path)
}
