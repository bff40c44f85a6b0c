package dev.phonekit.sample.bundle

import kotlinx.serialization.SerialName
import kotlinx.serialization.Serializable
import kotlinx.serialization.SerializationException
import kotlinx.serialization.json.Json
import kotlinx.serialization.json.JsonObject
import kotlinx.serialization.json.JsonPrimitive
import kotlinx.serialization.json.jsonObject

/*
 * manifest.json of a phonekit bundle, field for field as phonekit/schemas/bundle-1.schema.json
 * declares it (schema "phonekit.bundle/1"). tests/test_apps.py parses this file and fails when a
 * schema field is missing here or has the wrong type or nullability, so the contract cannot drift:
 * a required field has no default, a field the schema allows to be null is Kotlin-nullable, and a
 * field the schema does not require has a default.
 */

/** A one-line problem with a bundle, shown to the user as is. */
class BundleException(message: String) : Exception(message)

@Serializable
data class BundleManifest(
    val schema: String,
    @SerialName("phonekit_version") val phonekitVersion: String,
    val model: ModelInfo,
    @SerialName("context_length") val contextLength: Long,
    val quantization: Quantization,
    val tokenizer: TokenizerInfo,
    val artifacts: List<Artifact>,
    val budget: Budget?,
    val eval: JsonObject? = null,
) {
    fun artifact(format: String): Artifact? = artifacts.firstOrNull { it.format == format }

    companion object {
        const val SCHEMA = "phonekit.bundle/1"

        // phonekit may add facts (per-format details, notes) without a new schema version,
        // so keys this app does not know are skipped rather than rejected.
        private val json = Json { ignoreUnknownKeys = true }

        /** Parses manifest.json; every failure is a [BundleException] naming what to do. */
        fun parse(text: String): BundleManifest {
            val tree = try {
                json.parseToJsonElement(text).jsonObject
            } catch (e: IllegalArgumentException) {
                throw BundleException("manifest.json is not a JSON object (${e.message}); re-export the bundle")
            }
            // Check the version first: a future schema may not decode into these types at all.
            val schema = (tree["schema"] as? JsonPrimitive)?.content
            if (schema != SCHEMA) {
                throw BundleException("manifest.json has schema '$schema', this app reads '$SCHEMA'; export the bundle with a matching phonekit")
            }
            return try {
                json.decodeFromJsonElement(serializer(), tree)
            } catch (e: SerializationException) {
                throw BundleException("manifest.json does not match $SCHEMA (${e.message?.lineSequence()?.first()}); re-export the bundle")
            }
        }
    }
}

@Serializable
data class ModelInfo(
    val id: String,
    val family: String,
    val params: Long,
    @SerialName("hub_id") val hubId: String? = null,
    val license: String? = null,
    val source: String? = null,
    @SerialName("layer_sharing") val layerSharing: Boolean,
    @SerialName("block_applications") val blockApplications: Long,
    @SerialName("max_context") val maxContext: Long,
    val config: JsonObject,
)

@Serializable
data class Quantization(
    val scheme: String,
    val weights: String,
    @SerialName("weight_method") val weightMethod: String? = null,
    @SerialName("source_grid") val sourceGrid: JsonObject? = null,
    val activations: String,
    val embedding: JsonObject?,
    @SerialName("kept_float") val keptFloat: List<String>,
)

@Serializable
data class TokenizerInfo(
    val files: List<FileEntry>,
    val kind: String? = null,
    @SerialName("bos_id") val bosId: Long?,
    @SerialName("eos_ids") val eosIds: List<Long>,
    @SerialName("add_bos") val addBos: Boolean,
    @SerialName("chat_template") val chatTemplate: String?,
    @SerialName("vocab_size") val vocabSize: Long,
)

@Serializable
data class Artifact(
    val format: String,
    val file: String,
    val backend: String,
    val platforms: List<String>,
    val runtime: String,
    val bytes: Long,
    val sha256: String,
    val files: List<FileEntry>,
    val details: ArtifactDetails? = null,
)

/** The parts of an artifact's free-form `details` this app uses. */
@Serializable
data class ArtifactDetails(
    // The scheme this artifact was quantized with (a format may get a counterpart scheme).
    val quantization: Quantization? = null,
    // Written by the ONNX exporter: can onnxruntime-genai run the bundle folder?
    @SerialName("onnxruntime_genai") val onnxruntimeGenai: GenAiSupport? = null,
)

@Serializable
data class GenAiSupport(
    val compatible: Boolean,
    val reason: String? = null,
)

@Serializable
data class Budget(
    @SerialName("budget_fraction") val budgetFraction: Double? = null,
    @SerialName("allow_over_budget") val allowOverBudget: Boolean? = null,
    val verdicts: List<Verdict> = emptyList(),
)

@Serializable
data class Verdict(
    val device: String,
    val format: String,
    @SerialName("dram_bytes") val dramBytes: Long? = null,
    @SerialName("budget_bytes") val budgetBytes: Long,
    @SerialName("estimate_bytes") val estimateBytes: Long,
    @SerialName("headroom_bytes") val headroomBytes: Long? = null,
    val fits: Boolean,
    @SerialName("fits_os_limit") val fitsOsLimit: Boolean? = null,
)

@Serializable
data class FileEntry(
    val path: String,
    val bytes: Long,
    val sha256: String,
)
