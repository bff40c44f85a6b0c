package dev.phonekit.sample.engine

import dev.phonekit.sample.bundle.Artifact
import dev.phonekit.sample.bundle.BundleException
import dev.phonekit.sample.bundle.BundleManifest
import java.io.Closeable
import java.io.File

data class ChatMessage(val role: String, val content: String)

data class GenerationStats(
    val promptTokens: Int?,
    val generatedTokens: Int,
    val prefillTokensPerSecond: Double?,
    val decodeTokensPerSecond: Double,
)

/** One runtime driving one artifact. Calls block; the view model runs them off the main thread. */
interface ChatEngine : Closeable {
    val label: String

    fun load()

    /** Generates a reply to [prompt], calling [onToken] with each new piece of text. */
    fun generate(prompt: String, maxNewTokens: Int, onToken: (String) -> Unit): GenerationStats

    /** Asks a running [generate] to return early; safe from any thread. */
    fun stop()
}

object ChatEngines {
    /** The engine for [artifact], or a [BundleException] saying which artifact to use instead. */
    fun open(dir: File, manifest: BundleManifest, artifact: Artifact): ChatEngine = when (artifact.format) {
        "pte" -> ExecuTorchEngine(dir, manifest, artifact)
        "onnx" -> {
            val genai = artifact.details?.onnxruntimeGenai
            if (genai?.compatible != true) {
                val why = genai?.reason ?: "the manifest does not mark it onnxruntime-genai compatible"
                throw BundleException("this ONNX artifact cannot run in onnxruntime-genai ($why); ${alternative(manifest)}")
            }
            GenAiEngine(dir, manifest, artifact)
        }
        "coreml" -> throw BundleException("Core ML models run on iOS only; ${alternative(manifest)}")
        else -> throw BundleException("unknown artifact format '${artifact.format}'; ${alternative(manifest)}")
    }

    private fun alternative(manifest: BundleManifest): String =
        if (manifest.artifact("pte") != null) {
            "pick this bundle's .pte artifact"
        } else {
            "re-export with phonekit export --target android (it adds a .pte)"
        }
}

/** The tokenizer file the runtimes read: tokenizer.json, else SentencePiece tokenizer.model. */
fun tokenizerFile(dir: File, manifest: BundleManifest): File {
    val names = manifest.tokenizer.files.map { it.path }
    val name = listOf("tokenizer.json", "tokenizer.model").firstOrNull { it in names }
        ?: throw BundleException("the bundle has no tokenizer (exported from random weights); it cannot chat")
    return File(dir, name)
}

/**
 * Renders the conversation as the model was trained to read it. The manifest carries the
 * checkpoint's Jinja chat template; Android has no Jinja engine, so this renders the ChatML
 * family (SmolLM2, Qwen, PLM: `<|im_start|>role\n...<|im_end|>`) including the template's
 * default system prompt, and sends anything else as plain text, like `phonekit run` without
 * a template.
 */
class ChatFormat(template: String?) {
    val isChatMl: Boolean = template?.contains(IM_START) == true

    /** The system turn the template adds when the conversation has none (SmolLM2 has one). */
    val defaultSystemPrompt: String? =
        template?.let { DEFAULT_SYSTEM.find(it)?.groupValues?.get(1) }

    /** True when a template exists but is not one this app can render. */
    val unsupportedTemplate: Boolean = template != null && !isChatMl

    fun render(messages: List<ChatMessage>): String {
        if (!isChatMl) return messages.joinToString("\n") { it.content }
        val out = StringBuilder()
        if (messages.firstOrNull()?.role != "system" && defaultSystemPrompt != null) {
            out.append(IM_START).append("system\n").append(defaultSystemPrompt).append(IM_END).append('\n')
        }
        for (m in messages) out.append(IM_START).append(m.role).append('\n').append(m.content).append(IM_END).append('\n')
        return out.append(IM_START).append("assistant\n").toString()
    }

    companion object {
        const val IM_START = "<|im_start|>"
        const val IM_END = "<|im_end|>"

        // A literal system turn inside the template; its newline is either a real newline or
        // the two characters \n of a Jinja string literal. Text with quotes or braces is a
        // template expression, not a default prompt.
        val DEFAULT_SYSTEM = Regex("""<\|im_start\|>system(?:\n|\\n)([^'"{}]*?)<\|im_end\|>""")
    }
}
