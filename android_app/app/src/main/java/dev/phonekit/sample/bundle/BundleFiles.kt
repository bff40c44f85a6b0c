package dev.phonekit.sample.bundle

import android.content.Context
import java.io.File
import java.io.IOException
import java.security.MessageDigest

/** A bundle folder on this phone together with its parsed manifest (or why it cannot be read). */
data class LocalBundle(val dir: File, val manifest: BundleManifest?, val problem: String?) {
    val name: String get() = dir.name
}

/**
 * Where bundles live: `files/bundles/NAME` (what `phonekit push android` fills through run-as)
 * and the app's external files folder `Android/data/PKG/files/bundles/NAME` (`push --external`).
 */
object BundleStore {
    fun roots(context: Context): List<File> =
        listOfNotNull(File(context.filesDir, "bundles"), context.getExternalFilesDir("bundles"))

    fun list(context: Context): List<LocalBundle> =
        roots(context)
            .flatMap { root -> root.listFiles { f -> f.isDirectory }?.toList().orEmpty() }
            .sortedBy { it.name }
            .map { dir -> read(dir) }

    fun read(dir: File): LocalBundle {
        val file = File(dir, "manifest.json")
        if (!file.isFile) return LocalBundle(dir, null, "no manifest.json in ${dir.name}; push a folder written by phonekit export")
        return try {
            LocalBundle(dir, BundleManifest.parse(file.readText()), null)
        } catch (e: BundleException) {
            LocalBundle(dir, null, e.message)
        } catch (e: IOException) {
            LocalBundle(dir, null, "cannot read ${file.path} (${e.message})")
        }
    }
}

/** The files an artifact needs: the tokenizer's files and the artifact's own (manifest order). */
fun filesToVerify(manifest: BundleManifest, artifact: Artifact): List<FileEntry> = manifest.tokenizer.files + artifact.files

/**
 * Checks the size and sha256 of every file [artifact] needs before anything is loaded, as
 * `phonekit run` does on a computer: a truncated copy or a swapped file must never reach the
 * runtime. Reports progress as (bytes hashed, bytes in total).
 */
fun verifyBundle(dir: File, manifest: BundleManifest, artifact: Artifact, onProgress: (Long, Long) -> Unit = { _, _ -> }) {
    val entries = filesToVerify(manifest, artifact)
    val total = entries.sumOf { it.bytes }
    var done = 0L
    val buffer = ByteArray(1 shl 20)
    for (entry in entries) {
        val file = resolveInBundle(dir, entry.path)
        if (!file.isFile) throw BundleException("${entry.path} is listed in manifest.json but missing; push the whole bundle again")
        if (file.length() != entry.bytes) {
            throw BundleException("${entry.path} has ${file.length()} bytes, manifest.json says ${entry.bytes}; the copy is incomplete, push it again")
        }
        val digest = MessageDigest.getInstance("SHA-256")
        file.inputStream().use { input ->
            while (true) {
                val n = input.read(buffer)
                if (n < 0) break
                digest.update(buffer, 0, n)
                done += n
                onProgress(done, total)
            }
        }
        if (hex(digest.digest()) != entry.sha256) {
            throw BundleException("${entry.path}: sha256 does not match manifest.json; the file was modified or corrupted, push the bundle again")
        }
    }
}

/** Lowercase hex, the form phonekit writes into manifest.json. */
fun hex(bytes: ByteArray): String = bytes.joinToString("") { "%02x".format(it) }

/** A manifest path inside [dir]; a path that would leave the bundle folder is refused. */
fun resolveInBundle(dir: File, path: String): File {
    val parts = path.split('/')
    if (path.startsWith("/") || parts.any { it == ".." || it.isEmpty() }) {
        throw BundleException("manifest.json lists the path '$path', which leaves the bundle folder; re-export the bundle")
    }
    return File(dir, path)
}
