//! Score semantics: turns a pair's logits into the score users see, exactly as sentence-transformers' CrossEncoder.

use serde::Serialize;

/// The activation a single-logit model applies to its logit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    Sigmoid,
    Identity,
    Tanh,
}

impl Activation {
    /// Parses sentence-transformers' saved `activation_fn` (a torch class path such as
    /// `torch.nn.modules.activation.Sigmoid`); None when the name is not one we implement.
    pub fn from_torch_path(path: &str) -> Option<Self> {
        match path.rsplit('.').next()? {
            "Sigmoid" => Some(Self::Sigmoid),
            "Identity" => Some(Self::Identity),
            "Tanh" => Some(Self::Tanh),
            _ => None,
        }
    }

    fn apply(self, x: f32) -> f32 {
        match self {
            Self::Sigmoid => sigmoid(x),
            Self::Identity => x,
            Self::Tanh => x.tanh(),
        }
    }
}

/// How the logits of one pair become its score.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scoring {
    /// One logit, passed through the activation.
    SingleLogit(Activation),
    /// Two logits: the score is the softmax probability of label 1.
    TwoLabelSoftmax,
}

impl Scoring {
    pub fn num_labels(self) -> usize {
        match self {
            Self::SingleLogit(_) => 1,
            Self::TwoLabelSoftmax => 2,
        }
    }

    /// The raw score: the logit, or for two labels logit[1] - logit[0] (so that sigmoid(raw) = P(label 1)).
    pub fn raw(self, logits: &[f32]) -> f32 {
        match (self, logits) {
            (Self::SingleLogit(_), [logit, ..]) => *logit,
            (Self::TwoLabelSoftmax, [l0, l1, ..]) => l1 - l0,
            _ => f32::NAN,
        }
    }

    /// The activated score users see unless they ask for raw scores.
    pub fn score(self, logits: &[f32]) -> f32 {
        match self {
            Self::SingleLogit(activation) => activation.apply(self.raw(logits)),
            // softmax([l0, l1])[1] == sigmoid(l1 - l0), computed without overflow.
            Self::TwoLabelSoftmax => sigmoid(self.raw(logits)),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::SingleLogit(Activation::Sigmoid) => "sigmoid",
            Self::SingleLogit(Activation::Identity) => "identity",
            Self::SingleLogit(Activation::Tanh) => "tanh",
            Self::TwoLabelSoftmax => "softmax",
        }
    }
}

fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_torch_class_paths() {
        assert_eq!(
            Activation::from_torch_path("torch.nn.modules.activation.Sigmoid"),
            Some(Activation::Sigmoid)
        );
        assert_eq!(
            Activation::from_torch_path("torch.nn.modules.linear.Identity"),
            Some(Activation::Identity)
        );
        assert_eq!(
            Activation::from_torch_path("torch.nn.Tanh"),
            Some(Activation::Tanh)
        );
        assert_eq!(
            Activation::from_torch_path("torch.nn.modules.activation.GELU"),
            None
        );
    }

    #[test]
    fn two_label_score_is_softmax_of_label_one() {
        let logits = [0.3_f32, -1.2];
        let (e0, e1) = (logits[0].exp(), logits[1].exp());
        let softmax1 = e1 / (e0 + e1);
        assert!((Scoring::TwoLabelSoftmax.score(&logits) - softmax1).abs() < 1e-7);
        assert_eq!(Scoring::TwoLabelSoftmax.raw(&logits), -1.5);
        assert_eq!(Scoring::TwoLabelSoftmax.score(&[-200.0, 200.0]), 1.0);
    }

    #[test]
    fn single_logit_activations() {
        assert!((Scoring::SingleLogit(Activation::Sigmoid).score(&[0.0]) - 0.5).abs() < 1e-7);
        assert_eq!(
            Scoring::SingleLogit(Activation::Identity).score(&[-3.5]),
            -3.5
        );
        assert!(
            (Scoring::SingleLogit(Activation::Tanh).score(&[1.0]) - 1.0_f32.tanh()).abs() < 1e-7
        );
        assert_eq!(Scoring::SingleLogit(Activation::Sigmoid).raw(&[2.5]), 2.5);
        assert_eq!(
            Scoring::SingleLogit(Activation::Sigmoid).score(&[-1000.0]),
            0.0
        );
    }
}
