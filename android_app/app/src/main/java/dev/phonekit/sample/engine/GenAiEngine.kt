package dev.phonekit.sample.engine

import ai.onnxruntime.genai.Generator
import ai.onnxruntime.genai.GeneratorParams
import ai.onnxruntime.genai.Model
import ai.onnxruntime.genai.Tokenizer
import android.os.SystemClock
import dev.phonekit.sample.bundle.Artifact
import dev.phonekit.sample.bundle.BundleManifest
import dev.phonekit.sample.bundle.resolveInBundle
import java.io.File

/**
 * `.onnx` through onnxruntime-genai. phonekit writes `genai_config.json` next to `model.onnx`
 * in the bundle folder, so that folder is what `Model` opens (its tokenizer included).
 * Greedy decoding, like `phonekit run`.
 */
class GenAiEngine(
    private val dir: File,
    private val manifest: BundleManifest,
    private val artifact: Artifact,
) : ChatEngine {
    override val label = "onnxruntime-genai · CPU"

    private var model: Model? = null
    private var tokenizer: Tokenizer? = null

    @Volatile private var stopRequested = false

    override fun load() {
        val folder = resolveInBundle(dir, artifact.file).parentFile ?: dir
        val m = Model(folder.path)
        model = m
        tokenizer = Tokenizer(m)
    }

    override fun generate(prompt: String, maxNewTokens: Int, onToken: (String) -> Unit): GenerationStats {
        val m = checkNotNull(model) { "load() must run before generate()" }
        val tok = checkNotNull(tokenizer)
        stopRequested = false
        val ids = tok.encode(prompt).use { it.getSequence(0) }.toMutableList()
        val bos = manifest.tokenizer.bosId?.toInt()
        if (manifest.tokenizer.addBos && bos != null && ids.firstOrNull() != bos) ids.add(0, bos)
        val eos = manifest.tokenizer.eosIds.map { it.toInt() }.toSet()
        val maxLength = minOf(ids.size + maxNewTokens, manifest.contextLength.toInt())

        var generated = 0
        var prefillMs = 0L
        var decodeMs = 0L
        GeneratorParams(m).use { params ->
            params.setSearchOption("max_length", maxLength.toDouble())
            params.setSearchOption("do_sample", false)
            Generator(m, params).use { generator ->
                val t0 = SystemClock.elapsedRealtime()
                // appendTokens runs the prompt through the model (the prefill).
                generator.appendTokens(ids.toIntArray())
                val t1 = SystemClock.elapsedRealtime()
                prefillMs = t1 - t0
                tok.createStream().use { stream ->
                    while (!generator.isDone() && !stopRequested) {
                        generator.generateNextToken()
                        val token = generator.getLastTokenInSequence(0)
                        if (token in eos) break
                        generated++
                        onToken(stream.decode(token))
                    }
                }
                decodeMs = SystemClock.elapsedRealtime() - t1
            }
        }
        return GenerationStats(
            promptTokens = ids.size,
            generatedTokens = generated,
            prefillTokensPerSecond = perSecond(ids.size, prefillMs),
            decodeTokensPerSecond = perSecond(generated, decodeMs),
        )
    }

    override fun stop() {
        stopRequested = true
    }

    override fun close() {
        tokenizer?.close()
        model?.close()
        tokenizer = null
        model = null
    }
}
