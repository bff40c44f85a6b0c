package dev.phonekit.sample.engine

import android.os.SystemClock
import dev.phonekit.sample.bundle.Artifact
import dev.phonekit.sample.bundle.BundleManifest
import dev.phonekit.sample.bundle.resolveInBundle
import kotlinx.serialization.json.Json
import kotlinx.serialization.json.JsonObject
import kotlinx.serialization.json.jsonObject
import kotlinx.serialization.json.jsonPrimitive
import kotlinx.serialization.json.longOrNull
import org.pytorch.executorch.extension.llm.LlmCallback
import org.pytorch.executorch.extension.llm.LlmGenerationConfig
import org.pytorch.executorch.extension.llm.LlmModule
import org.pytorch.executorch.extension.llm.LlmModuleConfig
import java.io.File

/**
 * `.pte` through ExecuTorch's LlmModule: the Android wrapper of the same C++ text runner
 * (TextLLMRunner) that phonekit's ExecuTorch tests drive, with the bundle's tokenizer file.
 * The runner reads context length and EOS ids from the program's metadata methods.
 */
class ExecuTorchEngine(
    private val dir: File,
    private val manifest: BundleManifest,
    private val artifact: Artifact,
) : ChatEngine {
    override val label = "ExecuTorch ${artifact.runtime.substringAfter(' ')} · ${artifact.backend}"

    private var module: LlmModule? = null

    // The runner prepends BOS only when asked (its default is 0); phonekit's manifest says
    // whether the model wants one (MobileLLM: yes, SmolLM2's chat template: no).
    private val bosCount = if (manifest.tokenizer.addBos && manifest.tokenizer.bosId != null) 1 else 0

    override fun load() {
        val config = LlmModuleConfig.create()
            .modulePath(resolveInBundle(dir, artifact.file).path)
            .tokenizerPath(tokenizerFile(dir, manifest).path)
            .temperature(0f)
            .dataPath(null)
            .numBos(bosCount)
            // mmap without mlock: pages stay evictable, which is what the memory budget assumes.
            .loadMode(LlmModuleConfig.LOAD_MODE_MMAP)
            .build()
        module = LlmModule(config).also { it.load() }
    }

    override fun generate(prompt: String, maxNewTokens: Int, onToken: (String) -> Unit): GenerationStats {
        val m = checkNotNull(module) { "load() must run before generate()" }
        // Each turn re-renders the whole conversation, so the cache starts empty every time.
        m.resetContext()
        val config = LlmGenerationConfig.create()
            .echo(false)
            .seqLen(manifest.contextLength.toInt())
            .maxNewTokens(maxNewTokens)
            .temperature(0f)
            .numBos(bosCount)
            .build()
        var statsJson: String? = null
        var pieces = 0
        val start = SystemClock.elapsedRealtime()
        var firstPiece = 0L
        m.generate(prompt, config, object : LlmCallback {
            override fun onResult(result: String) {
                if (pieces == 0) firstPiece = SystemClock.elapsedRealtime()
                pieces++
                onToken(result)
            }

            override fun onStats(stats: String) {
                statsJson = stats
            }
        })
        return statsJson?.let { parseStats(it) } ?: GenerationStats(
            promptTokens = null,
            generatedTokens = pieces,
            prefillTokensPerSecond = null,
            decodeTokensPerSecond = perSecond(pieces - 1, SystemClock.elapsedRealtime() - (if (pieces > 0) firstPiece else start)),
        )
    }

    override fun stop() {
        module?.stop()
    }

    override fun close() {
        module?.close()
        module = null
    }

    /** The runner's own timings (extension/llm/runner/stats.h), the numbers its demo app shows. */
    private fun parseStats(text: String): GenerationStats? {
        val obj: JsonObject = runCatching { Json.parseToJsonElement(text).jsonObject }.getOrNull() ?: return null
        fun field(name: String): Long? = obj[name]?.jsonPrimitive?.longOrNull
        val promptTokens = field("prompt_tokens") ?: return null
        val generated = field("generated_tokens") ?: return null
        val start = field("inference_start_ms") ?: return null
        val promptEnd = field("prompt_eval_end_ms") ?: return null
        val end = field("inference_end_ms") ?: return null
        return GenerationStats(
            promptTokens = promptTokens.toInt(),
            generatedTokens = generated.toInt(),
            prefillTokensPerSecond = perSecond(promptTokens.toInt(), promptEnd - start),
            decodeTokensPerSecond = perSecond(generated.toInt(), end - promptEnd),
        )
    }
}

fun perSecond(count: Int, millis: Long): Double = if (millis <= 0 || count <= 0) 0.0 else count * 1000.0 / millis
