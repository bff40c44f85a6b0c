plugins {
    alias(libs.plugins.android.application)
    alias(libs.plugins.kotlin.android)
    alias(libs.plugins.kotlin.compose)
    alias(libs.plugins.kotlin.serialization)
}

// onnxruntime-genai publishes its Android library only as a GitHub release asset, so it
// is a file dependency; fail early with the download link instead of a missing-class error.
val genaiVersion = libs.versions.onnxruntimeGenai.get()
val genaiAar = file("libs/onnxruntime-genai-android-$genaiVersion.aar")
if (!genaiAar.isFile) {
    throw GradleException(
        "missing ${genaiAar.path}: download https://github.com/microsoft/onnxruntime-genai/releases/download/" +
            "v$genaiVersion/onnxruntime-genai-android-$genaiVersion.aar into android_app/app/libs/ (see README.md)",
    )
}

android {
    // The applicationId is the package `phonekit push android` copies bundles to.
    namespace = "dev.phonekit.sample"
    compileSdk = 36

    defaultConfig {
        applicationId = "dev.phonekit.sample"
        // ExecuTorch's LlmModule and onnxruntime-genai both run on Android 9+ (API 28).
        minSdk = 28
        targetSdk = 36
        versionCode = 1
        versionName = "0.1.0"
        // Both runtimes ship arm64-v8a and x86_64 native libraries only.
        ndk { abiFilters += listOf("arm64-v8a", "x86_64") }
    }

    buildTypes {
        release {
            isMinifyEnabled = false
            signingConfig = signingConfigs.getByName("debug")
        }
    }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    buildFeatures { compose = true }
    packaging {
        // Keep the runtimes' .so files uncompressed and page-aligned so they load in place.
        jniLibs { useLegacyPackaging = false }
    }
}

kotlin {
    compilerOptions { jvmTarget.set(org.jetbrains.kotlin.gradle.dsl.JvmTarget.JVM_17) }
}

dependencies {
    implementation(libs.androidx.core.ktx)
    implementation(libs.androidx.activity.compose)
    implementation(libs.androidx.lifecycle.runtime.compose)
    implementation(libs.androidx.lifecycle.viewmodel.compose)
    implementation(platform(libs.androidx.compose.bom))
    implementation(libs.androidx.compose.ui)
    implementation(libs.androidx.compose.material3)
    implementation(libs.androidx.compose.ui.tooling.preview)
    implementation(libs.kotlinx.coroutines.android)
    implementation(libs.kotlinx.serialization.json)

    // .pte: ExecuTorch's LLM runner (LlmModule) with the XNNPACK backend.
    implementation(libs.executorch.android)
    // .onnx: onnxruntime-genai (file dependency) on top of onnxruntime's own AAR.
    implementation(files(genaiAar))
    implementation(libs.onnxruntime.android)
}
